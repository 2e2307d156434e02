"""The package's layering, read from the sources' import statements (lazy imports included):
the torch references (``ops/``) import nothing above them, the backends never reach up into
the methods, IO (``io/``) never imports math, and no chain of imports leads back to where it
started. Also: the mode codes the C loops use are the ones ops/merge_spec.py defines."""

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


ABOVE_OPS = (
    "tritonmerge.methods", "tritonmerge.registry", "tritonmerge.catalog", "tritonmerge.backends",
    "tritonmerge.api", "tritonmerge.engine", "tritonmerge.config",
)
RULES = {
    "ops": ABOVE_OPS,
    "backends": ("tritonmerge.methods", "tritonmerge.catalog", "tritonmerge.api", "tritonmerge.engine", "tritonmerge.config"),
    "io": ("tritonmerge.ops", "tritonmerge.backends", "tritonmerge.methods", "tritonmerge.registry", "tritonmerge.catalog"),
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


def _module_of(name: str, modules: set[str]) -> str | None:
    """The module an imported name lives in: the longest prefix that is a module of the package."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def import_graph(package: Path) -> dict[str, set[str]]:
    """module -> the package's modules it imports (lazy imports included). ``from pkg import sub``
    is an edge to ``pkg.sub`` alone: that every submodule first initialises its parent package
    is Python's mechanics, not a dependency of the code."""
    paths = {_module_name(p): p for p in sorted(package.rglob("*.py"))}
    modules = set(paths)
    graph: dict[str, set[str]] = {}
    for module, path in paths.items():
        names = imports_of(path)
        targets = set()
        for name in names:
            # a target that is also named with one of its attributes (``from x import y``) was
            # added as the bare module too; keep it only if nothing under it is named
            if any(other.startswith(name + ".") for other in names) and name in modules:
                continue
            found = _module_of(name, modules)
            if found is not None and found != module:
                targets.add(found)
        graph[module] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle():
    assert find_cycle(import_graph(PACKAGE)) is None


def test_the_cycle_check_finds_a_lazy_cycle(tmp_path):
    root = tmp_path / "tritonmerge"
    (root / "ops").mkdir(parents=True)
    (root / "__init__.py").write_text("", encoding="utf-8")
    (root / "ops" / "__init__.py").write_text("", encoding="utf-8")
    (root / "ops" / "a.py").write_text("from . import b\n", encoding="utf-8")
    (root / "ops" / "b.py").write_text("def f():\n    from .a import g\n", encoding="utf-8")
    global PACKAGE
    saved, PACKAGE = PACKAGE, root
    try:
        assert find_cycle(import_graph(root)) == ["tritonmerge.ops.a", "tritonmerge.ops.b", "tritonmerge.ops.a"]
    finally:
        PACKAGE = saved


def test_the_c_loops_use_the_mode_codes_of_the_merge_spec():
    """merge_cpu.c's enums carry ops/merge_spec.py's numbers (the one definition of the codes)."""
    import re

    from tritonmerge.ops.merge_spec import Divide, Elect, Keep, Rescale

    source = (PACKAGE / "backends" / "cpu" / "merge_cpu.c").read_text(encoding="utf-8")
    found = {name: int(value) for name, value in re.findall(r"\b((?:KEEP|RESCALE|ELECT|DIV)_[A-Z_]+) = (\d+)", source)}
    expected = {
        **{f"KEEP_{k.name}": int(k) for k in Keep if k != Keep.RANKED_RANDOM},  # the C loops decline DELLA
        **{f"RESCALE_{r.name}": int(r) for r in Rescale},
        **{f"ELECT_{e.name}": int(e) for e in Elect},
        **{f"DIV_{d.name}": int(d) for d in Divide},
    }
    assert found == expected
