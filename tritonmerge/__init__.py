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

__version__ = "0.1.0"

__all__ = [
    "merge_tensors",
    "merge_state_dicts",
    "list_methods",
    "get_method",
    "describe",
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
