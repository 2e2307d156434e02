"""The registry lists every method of issue 2, each self-described (doc, parameter descriptions),
and the README's generated method table is current."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

import tritonmerge as tm
from tritonmerge.params import describe_params
from tritonmerge.catalog import method_table

ROOT = Path(__file__).resolve().parents[1]

REQUIRED_METHODS = [
    "linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude", "breadcrumbs",
    "della", "consensus", "model_stock", "slerp", "wudi", "tadrop", "lwptv",
]  # fmt: skip


def load_table_tool():
    spec = importlib.util.spec_from_file_location("gen_method_table", ROOT / "tools" / "gen_method_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", REQUIRED_METHODS)
def test_required_method_is_registered(name):
    assert name in tm.list_methods(), f"{name} is not registered; registered: {tm.list_methods()}"


def test_list_methods_is_sorted_and_unique():
    names = tm.list_methods()
    assert names == sorted(set(names))


@pytest.mark.parametrize("name", tm.list_methods())
def test_method_is_self_described(name):
    spec = tm.get_method(name)
    assert spec.name == name
    assert spec.doc.strip() and "\n" not in spec.doc, f"{name}: doc must be one non-empty line"
    assert spec.reference.strip(), f"{name}: no reference given"
    for row in describe_params(spec.params):
        assert row["description"].strip(), f"{name}: parameter {row['name']!r} has no description"
    assert spec.min_experts >= 1
    assert spec.max_experts is None or spec.max_experts >= spec.min_experts


@pytest.mark.parametrize("name", tm.list_methods())
def test_describe_reports_every_parameter(name):
    info = tm.describe(name)
    assert info["name"] == name and info["doc"] == tm.get_method(name).doc
    assert "torch" in info["backends"]
    fields = tm.get_method(name).params.model_fields
    assert [row["name"] for row in info["params"]] == [f.alias or k for k, f in fields.items()]
    for row in info["params"]:
        assert {"name", "default", "required", "per_model", "description", "allowed"} <= set(row)


@pytest.mark.parametrize("name", tm.list_methods())
def test_defaults_validate(name):
    """Every method (a modifier with the method it needs) accepts its own defaults."""
    spec = tm.get_method(name)
    required = [row["name"] for row in describe_params(spec.params) if row["required"]]
    if spec.modifier:
        required = [r for r in required if r != "merge_method"]
        params = {"merge_method": "ties"}
    else:
        params = {}
    assert not required, f"{name}: parameters without defaults: {required}"
    spec.validate(params)


def test_generated_table_lists_every_method_and_parameter():
    table = load_table_tool().render()
    for name, spec in method_table().items():
        if name.startswith("_"):  # private (test-only) methods are left out of the docs
            continue
        row = next((line for line in table.splitlines() if line.startswith(f"| `{name}` |")), None)
        assert row is not None, f"{name} missing from the generated table"
        for p in describe_params(spec.params):
            assert f"`{p['name']}` = " in row, f"{name}: parameter {p['name']} missing from its row"
        assert row.count(" | ") == 4, f"{name}: a cell leaks an unescaped '|': {row}"


def test_readme_method_table_is_current():
    tool = load_table_tool()
    readme = ROOT / "README.md"
    if not readme.exists() or tool.readme_block(readme.read_text(encoding="utf-8")) is None:
        pytest.skip(f"README.md has no {tool.START} ... {tool.END} markers yet")
    problems = tool.check(readme)
    assert not problems, "\n".join(problems)
