"""Task files: parsing, class-balanced splits, and the seeded character noise of the corrupted set.

A task file (YAML or JSON) has ``settings`` and a list of ``tasks``; each task names a data source
(sources.py), the source's options, its labels with a short description each (the zero-shot
head), the number of items per class in each split, and a role:

- ``in_distribution``: an expert is fine-tuned on its train split and merged; val selects the
  merge coefficients; test is reported; its test (and val) items, corrupted, form the
  ``corrupted`` OOD set, scored with the task's own head.
- ``held_out``: never fine-tuned nor merged; scored zero-shot through its own head.
- ``domain_shift``: other inputs scored with the head of the in-distribution task named by
  ``head`` (its labels must be the same).

Splits are drawn per class with ``random.Random`` seeded by a string (stable across Python
versions and machines), without overlap between train, val and test.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .sources import load_source

ROLES = ("in_distribution", "held_out", "domain_shift")
SPLITS = ("train", "val", "test")
OOD_GROUPS = ("held_out", "domain_shift", "corrupted")

DEFAULT_SETTINGS: dict[str, Any] = {
    "max_length": 48,
    "temperature": 0.05,
    "split_seed": 0,
    "corruption": {"rate": 0.12, "salt": "tritonmerge-quality"},
    "finetune": {"lr": 1e-4, "batch_size": 16, "epochs": 2, "weight_decay": 0.0, "warmup_frac": 0.1},
    # precision of the evaluation forward passes (fine-tuning and the heads stay float32)
    "eval_precision": "float32",
}
EVAL_PRECISIONS = ("float32", "bfloat16")


@dataclass
class TaskSpec:
    name: str
    role: str
    source: str
    labels: dict[str, str]  # label key in the source -> description embedded for the head
    per_class: dict[str, int]
    options: dict[str, Any] = field(default_factory=dict)
    head: str | None = None  # domain_shift: the in-distribution task whose head scores it

    @property
    def head_task(self) -> str:
        return self.head or self.name

    def fingerprint(self) -> str:
        """Hash of everything that determines this task's data and head."""
        blob = json.dumps(
            [self.name, self.source, self.options, self.labels, self.per_class], sort_keys=True, default=str
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class TaskFile:
    path: Path
    settings: dict[str, Any]
    tasks: list[TaskSpec]

    def by_role(self, role: str) -> list[TaskSpec]:
        return [t for t in self.tasks if t.role == role]

    def get(self, name: str) -> TaskSpec:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(f"no task named {name!r} in {self.path}")


def _merge_settings(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge_settings(base[key], value) if isinstance(value, Mapping) and key in base else value
    return out


def load_task_file(path: str | Path) -> TaskFile:
    """Parse and check a task file (``.yaml``/``.yml`` or ``.json``)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        raw = json.loads(text)
    else:
        import yaml

        raw = yaml.safe_load(text)
    settings = _merge_settings(DEFAULT_SETTINGS, raw.get("settings") or {})
    if settings["eval_precision"] not in EVAL_PRECISIONS:
        raise ValueError(f"{path}: settings.eval_precision {settings['eval_precision']!r} is not one of {EVAL_PRECISIONS}")
    tasks = []
    for i, entry in enumerate(raw.get("tasks") or []):
        missing = [k for k in ("name", "role", "source", "labels", "per_class") if k not in entry]
        if missing:
            raise ValueError(f"{path}: task #{i} lacks {missing}")
        if entry["role"] not in ROLES:
            raise ValueError(f"{path}: task {entry['name']!r} has role {entry['role']!r}; allowed: {ROLES}")
        per_class = {k: int(v) for k, v in entry["per_class"].items()}
        unknown = set(per_class) - set(SPLITS)
        if unknown:
            raise ValueError(f"{path}: task {entry['name']!r}: per_class has unknown splits {sorted(unknown)}")
        if entry["role"] == "in_distribution" and min(per_class.get(s, 0) for s in SPLITS) <= 0:
            raise ValueError(f"{path}: in-distribution task {entry['name']!r} needs train, val and test sizes")
        tasks.append(
            TaskSpec(
                name=entry["name"],
                role=entry["role"],
                source=entry["source"],
                # a domain-shift task may list only label keys: its descriptions are its head's
                labels=(
                    {str(k): str(v) for k, v in entry["labels"].items()}
                    if isinstance(entry["labels"], Mapping)
                    else {str(k): "" for k in entry["labels"]}
                ),
                per_class=per_class,
                options=dict(entry.get("options") or {}),
                head=entry.get("head"),
            )
        )
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: task names repeat: {names}")
    spec = TaskFile(path=path, settings=settings, tasks=tasks)
    for t in tasks:
        if t.role == "domain_shift":
            if t.head is None:
                raise ValueError(f"{path}: domain-shift task {t.name!r} must name the task whose head scores it")
            head = spec.get(t.head)
            if head.role != "in_distribution":
                raise ValueError(f"{path}: task {t.name!r} takes its head from {t.head!r}, which is not in-distribution")
            if list(head.labels) != list(t.labels):
                raise ValueError(f"{path}: task {t.name!r} must have the labels of {t.head!r} in the same order")
            t.labels = dict(head.labels)
        elif t.head is not None:
            raise ValueError(f"{path}: only domain-shift tasks take 'head' (task {t.name!r})")
    if not spec.by_role("in_distribution"):
        raise ValueError(f"{path}: no in-distribution task")
    return spec


@dataclass
class Split:
    texts: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.texts)


def make_splits(task: TaskSpec, seed: int) -> dict[str, Split]:
    """Class-balanced, disjoint train/val/test splits (only the splits the task sizes)."""
    pools = load_source(task.source, task.options)
    splits = {s: Split([], []) for s in SPLITS if task.per_class.get(s, 0) > 0}
    need = sum(task.per_class.get(s, 0) for s in SPLITS)
    for class_index, label in enumerate(task.labels):
        if label not in pools:
            raise ValueError(
                f"task {task.name!r}: label {label!r} not in source {task.source!r}; it has {sorted(pools)}"
            )
        pool = list(pools[label])
        if len(pool) < need:
            raise ValueError(
                f"task {task.name!r}: label {label!r} has {len(pool)} texts, the splits need {need} per class"
            )
        random.Random(f"{seed}:{task.name}:{label}").shuffle(pool)
        start = 0
        for split in SPLITS:
            n = task.per_class.get(split, 0)
            if n:
                splits[split].texts.extend(pool[start : start + n])
                splits[split].labels.extend([class_index] * n)
                start += n
    return splits


def text_rng(text: str, salt: str) -> random.Random:
    """A generator seeded by SHA-256 of the text: the same noise on every run and machine
    (Python's ``hash`` of a str is salted per process)."""
    digest = hashlib.sha256(f"{salt}\x00{text}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


_NOISE_ALPHABET = "abcdefghijklmnopqrstuvwxyz"


def corrupt(text: str, rate: float, salt: str) -> str:
    """Character noise: each character is, with probability ``rate``, deleted, replaced by a
    random letter, swapped with the next one, or followed by an inserted letter (equally likely)."""
    rng = text_rng(text, salt)
    chars = list(text)
    out: list[str] = []
    i = 0
    while i < len(chars):
        c = chars[i]
        if c.isspace() or rng.random() >= rate:
            out.append(c)
            i += 1
            continue
        op = rng.randrange(4)
        if op == 0:  # delete
            pass
        elif op == 1:  # substitute
            out.append(rng.choice(_NOISE_ALPHABET))
        elif op == 2 and i + 1 < len(chars):  # swap with the next character
            out.extend([chars[i + 1], c])
            i += 1
        else:  # insert after
            out.extend([c, rng.choice(_NOISE_ALPHABET)])
        i += 1
    return "".join(out)
