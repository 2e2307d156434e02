#!/usr/bin/env python3
"""Generate the README's method table from the registry, so docs cannot drift from the code.

    python tools/gen_method_table.py                   # print the Markdown table
    python tools/gen_method_table.py --check README.md # exit 1 if the README's table is stale
    python tools/gen_method_table.py --write README.md # replace the README's table in place

The table lives between the lines ``<!-- methods:start -->`` and ``<!-- methods:end -->``.
One row per registered method: name, one-line doc, how many experts it takes, and every parameter
with its default, what values are allowed and its description.
"""

from __future__ import annotations

import argparse
import difflib
import sys
import typing
from pathlib import Path
from typing import Any

START = "<!-- methods:start -->"
END = "<!-- methods:end -->"


def _cell(text: str) -> str:
    """Make text safe inside a Markdown table cell (|τ| would otherwise split the cell)."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _literal_values(annotation: Any) -> list[Any] | None:
    """The choices of a Literal[...] annotation (also inside Optional/Union), else None."""
    if typing.get_origin(annotation) is typing.Literal:
        return list(typing.get_args(annotation))
    values: list[Any] = []
    for arg in typing.get_args(annotation):
        inner = _literal_values(arg)
        if inner:
            values += inner
    return values or None


def _default_text(info: Any) -> str:
    if info.is_required():
        return "required"
    default = info.get_default(call_default_factory=True)
    if isinstance(default, str):
        return f'"{default}"'
    if isinstance(default, bool):
        return "true" if default else "false"
    if default is None:
        return "none"
    if isinstance(default, (list, tuple)):
        return "[" + ", ".join(f'"{v}"' if isinstance(v, str) else str(v) for v in default) + "]"
    return str(default)


def _allowed_text(params_model: Any, field: str, row: dict[str, Any]) -> str:
    info = params_model.model_fields[field]
    choices = _literal_values(info.annotation)
    if choices:
        text = " | ".join(f'"{c}"' if isinstance(c, str) else str(c) for c in choices)
        if type(None) in typing.get_args(info.annotation):
            text += " | none"
        return text
    return row["allowed"]


def _experts_text(spec: Any) -> str:
    lo, hi = spec.min_experts, spec.max_experts
    if hi is None:
        return f"≥ {lo}"
    return str(lo) if lo == hi else f"{lo}–{hi}"


def parameter_lines(spec: Any) -> list[str]:
    """One Markdown line per parameter: `name` = default (allowed): description."""
    from tritonmerge.params import describe_params, param_names

    model = spec.params
    attrs = param_names(model)
    lines = []
    for row in describe_params(model):
        attr = attrs[row["name"]]
        allowed = _allowed_text(model, attr, row)
        line = f"`{row['name']}` = {_default_text(model.model_fields[attr])} ({allowed})"
        if row["description"]:
            line += f": {row['description']}"
        lines.append(_cell(line))
    return lines


# the "mergekit" column: methods compared against mergekit 0.1.5 itself, tensor by tensor
# (tests/test_mergekit_parity.py, which checks that these sets are the methods it compares)
MERGEKIT_PARITY = {"arcee_fusion", "breadcrumbs", "breadcrumbs_ties", "karcher", "linear", "model_stock",
                   "multislerp", "nearswap", "nuslerp", "passthrough", "ram", "ramplus_tl", "sce", "slerp",
                   "task_arithmetic", "ties"}
# random methods: other masks than mergekit's, the same distribution (a paired statistical test)
MERGEKIT_SAME_DISTRIBUTION = {"dare_linear", "dare_ties", "della", "della_linear"}


def _mergekit_text(name: str, spec: Any) -> str:
    if name in MERGEKIT_PARITY:
        return "same name, same result (parity test)"
    if name in MERGEKIT_SAME_DISTRIBUTION:
        return "same name, same distribution (random; statistical parity test)"
    return "tritonmerge-only"


def render() -> str:
    """The whole Markdown table for every registered method, sorted by name."""
    from tritonmerge.catalog import method_table  # importing the catalog registers every method

    out = [
        "| Method | What it does | Experts | mergekit | Parameters (default, allowed values) |",
        "|---|---|---|---|---|",
    ]
    for name, spec in method_table().items():
        if name.startswith("_"):  # private methods (tests register some) are not part of the docs
            continue
        doc = spec.doc
        notes = []
        if spec.modifier:
            notes.append("Modifier: wraps the method named by `merge_method`, whose parameters it also takes.")
        if spec.stochastic:
            notes.append("Random: reproducible per (`seed`, tensor name, expert).")
        if notes:
            doc += " " + " ".join(notes)
        params = "<br>".join(parameter_lines(spec)) or "none"
        out.append(f"| `{name}` | {_cell(doc)} | {_experts_text(spec)} | {_mergekit_text(name, spec)} | {params} |")
    return "\n".join(out) + "\n"


def readme_block(text: str) -> tuple[int, int] | None:
    """(start, end) offsets of the content between the markers, or None when they are absent."""
    start = text.find(START)
    end = text.find(END)
    if start < 0 or end < 0 or end < start:
        return None
    return start + len(START), end


def check(readme: Path) -> list[str]:
    """Problems with the README's method table: [] when it is current."""
    text = readme.read_text(encoding="utf-8")
    span = readme_block(text)
    if span is None:
        return [f"{readme}: no table markers ({START} ... {END})"]
    current = text[span[0] : span[1]].strip()
    wanted = render().strip()
    if current == wanted:
        return []
    diff = difflib.unified_diff(
        current.splitlines(), wanted.splitlines(), "README (current)", "registry (wanted)", lineterm="", n=0
    )
    return [
        f"{readme}: the method table is out of date; run `python tools/gen_method_table.py --write {readme}`",
        *diff,
    ]


def write(readme: Path) -> None:
    text = readme.read_text(encoding="utf-8")
    span = readme_block(text)
    if span is None:
        raise SystemExit(f"{readme}: no table markers ({START} ... {END}); add them where the table goes")
    readme.write_text(text[: span[0]] + "\n" + render() + text[span[1] :], encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--check", type=Path, metavar="README", help="verify the table between the markers is current")
    group.add_argument("--write", type=Path, metavar="README", help="replace the table between the markers")
    args = parser.parse_args(argv)
    if args.check:
        problems = check(args.check)
        for line in problems:
            print(line, file=sys.stderr)
        return 1 if problems else 0
    if args.write:
        write(args.write)
        return 0
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
    sys.exit(main())
