"""tritonmerge: a kernel-accelerated model-merging engine.

Public API: ``merge_tensors``, ``merge_state_dicts``, ``list_methods``, ``get_method``,
``describe``. Nothing GPU-related is imported here.
"""

from .api import describe, merge_state_dicts, merge_tensors
from .context import MergeReport
from .errors import (
    BackendUnavailableError,
    CheckpointError,
    ConfigError,
    InputError,
    NonFiniteResultError,
    ParameterError,
    TritonMergeError,
    UnknownMethodError,
)
from .registry import get_method, list_methods


def __getattr__(name: str):
    # The disk engine pulls in the IO stack; load it only when asked for.
    if name in ("run_merge", "MergeOptions", "plan_merge"):
        from . import engine

        return getattr(engine, name)
    if name == "load_config":
        from .config import load_config

        return load_config
    raise AttributeError(f"module 'tritonmerge' has no attribute {name!r}")

__version__ = "0.1.0"

__all__ = [
    "merge_tensors",
    "merge_state_dicts",
    "list_methods",
    "get_method",
    "describe",
    "run_merge",
    "MergeOptions",
    "plan_merge",
    "load_config",
    "MergeReport",
    "TritonMergeError",
    "ParameterError",
    "InputError",
    "UnknownMethodError",
    "BackendUnavailableError",
    "CheckpointError",
    "ConfigError",
    "NonFiniteResultError",
    "__version__",
]
