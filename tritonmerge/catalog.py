"""Every merge method, registered: importing this module imports ``methods/``, whose modules
register themselves in the registry. Code above the methods (the API, the config loader, the
CLI) looks methods up here; the registry itself never imports the methods, so that the
methods can import it without a cycle."""

from __future__ import annotations

from . import methods  # noqa: F401  (each method module registers itself)
from .registry import get_method, list_methods, method_table

__all__ = ["get_method", "list_methods", "method_table"]
