"""tritonmerge: a kernel-accelerated model-merging engine.

Public API: ``merge_tensors``, ``merge_state_dicts``, ``list_methods``, ``get_method``,
``describe``, ``run_merge``. Nothing GPU-related is imported here, and nothing that imports
torch is imported until a name that needs it is used: ``tritonmerge --help`` and ``--version``
answer without loading torch.
"""

from .errors import (
    BackendUnavailableError,
    CheckpointError,
    ConfigError,
    InputError,
    NonFiniteInputError,
    NonFiniteResultError,
    ParameterError,
    TritonMergeError,
    UnknownMethodError,
)

__version__ = "0.1.0"

# public name -> module that defines it, imported on first access (PEP 562)
_LAZY = {
    "merge_tensors": "api",
    "merge_state_dicts": "api",
    "describe": "api",
    "MergeReport": "context",
    "get_method": "catalog",
    "list_methods": "catalog",
    "run_merge": "engine",
    "MergeOptions": "engine",
    "plan_merge": "engine",
    "load_config": "config",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tritonmerge' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


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
    "NonFiniteInputError",
    "NonFiniteResultError",
    "__version__",
]
