"""The package's layering, read from the sources' import statements (lazy imports included):
the torch references and kernels (``ops/``, ``kernels/``) never reach up into the methods or
their registry, and IO (``io/``) never imports math."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tritonmerge"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every tritonmerge module or name an import statement of ``path`` names, resolved."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.update(f"{target}.{alias.name}" for alias in node.names)
            found.add(target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.startswith("tritonmerge")}


def _under(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


RULES = {
    "ops": ("tritonmerge.methods", "tritonmerge.registry"),
    "kernels": ("tritonmerge.methods", "tritonmerge.registry"),
    "io": ("tritonmerge.ops", "tritonmerge.kernels", "tritonmerge.methods", "tritonmerge.registry"),
}


@pytest.mark.parametrize("layer", sorted(RULES))
def test_no_import_reaches_above_its_layer(layer):
    bad = [
        f"{path.relative_to(PACKAGE.parent)} imports {name}"
        for path in sorted((PACKAGE / layer).rglob("*.py"))
        for name in sorted(imports_of(path))
        if _under(name, *RULES[layer])
    ]
    assert bad == []


def test_the_scan_sees_a_late_import(tmp_path):
    source = tmp_path / "tritonmerge" / "ops" / "x.py"
    source.parent.mkdir(parents=True)
    source.write_text("def f():\n    from ..methods.task_arithmetic import divisor_rule\n", encoding="utf-8")
    global PACKAGE
    saved, PACKAGE = PACKAGE, tmp_path / "tritonmerge"
    try:
        assert "tritonmerge.methods.task_arithmetic" in imports_of(source)
    finally:
        PACKAGE = saved
