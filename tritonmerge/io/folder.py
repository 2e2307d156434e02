"""The non-tensor files of an output folder: config.json, tokenizer and generation files, a model
card, the resolved merge config and the analysis decisions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

# copied from the base (or the tokenizer donor) when present, like mergekit does
TOKENIZER_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "added_tokens.json",
    "merges.txt",
    "vocab.json",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
)

CONFIG_NAME = "tritonmerge_config.yml"
DECISIONS_NAME = "tritonmerge_decisions.json"
REPORT_NAME = "tritonmerge_report.json"


def write_config_json(out: Path, base_config: dict[str, Any] | None, torch_dtype: str | None) -> bool:
    """Write the base's config.json with ``torch_dtype`` (and ``dtype``, its newer name, where the
    base uses it) set to the output dtype. Returns False when the base has no config.json."""
    if base_config is None:
        return False
    cfg = dict(base_config)
    if torch_dtype is not None:
        cfg["torch_dtype"] = torch_dtype
        if "dtype" in cfg:
            cfg["dtype"] = torch_dtype
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return True


def copy_tokenizer_files(src: Path | None, out: Path) -> list[str]:
    """Copy tokenizer and generation files from ``src``; returns the names copied."""
    copied = []
    if src is None:
        return copied
    for name in TOKENIZER_FILES:
        p = src / name
        if p.is_file():
            shutil.copyfile(p, out / name)
            copied.append(name)
    return copied


def write_model_card(
    out: Path,
    *,
    base_model: str,
    models: list[str],
    method: str,
    method_doc: str,
    parameters: dict[str, Any],
    config_yaml: str,
    version: str,
) -> None:
    """README.md with YAML front matter (base_model, tags, library) and the resolved config."""
    lines = [
        "---",
        f"base_model: {json.dumps(base_model)}",
        "library_name: transformers",
        "tags:",
        "- merge",
        "- tritonmerge",
        "---",
        "",
        "# Merged model",
        "",
        f"Made with tritonmerge {version} using **{method}**"
        + (f": {method_doc}" if method_doc else "."),
        "",
        f"- base model: `{base_model}`",
        "- merged models:",
        *[f"  - `{m}`" for m in models],
        "",
        "## Parameters",
        "",
        "```json",
        json.dumps(parameters, indent=2, sort_keys=True, default=str),
        "```",
        "",
        "## Configuration",
        "",
        "```yaml",
        config_yaml.rstrip(),
        "```",
        "",
    ]
    (out / "README.md").write_text("\n".join(lines), encoding="utf-8")


def write_json(out: Path, name: str, data: Any) -> None:
    (out / name).write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")


def write_text(out: Path, name: str, text: str) -> None:
    (out / name).write_text(text, encoding="utf-8")
