"""Quick tests of the benchmark harness itself (parity rules, results file, rendering)."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks.e2e import parity, render
from benchmarks.e2e.run import save_entry
from benchmarks.e2e.shapes import SHAPES


def test_shape_parameter_counts():
    # 2·V·H + L·(4H² + 3HI + 2H) + H
    assert SHAPES["150m"].num_params == 148_261_632
    assert 1.2e9 < SHAPES["1b"].num_params < 1.3e9


def test_ulp_of_bfloat16():
    x = torch.tensor([1.0, 1.5, 2.0, 0.02])
    assert parity.ulp(x, torch.bfloat16).tolist() == [2**-7, 2**-7, 2**-6, 2**-13]


def test_exact_parity_allows_one_ulp_and_counts_more():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.bfloat16)
    one_ulp = torch.tensor([1.0 + 2**-7, 2.0, 3.0, 4.0], dtype=torch.bfloat16)
    r = parity.compare_exact({"w": a}, {"w": one_ulp})
    assert r["ok"] and r["mismatch_fraction"] == 0 and r["equal_fraction"] == 0.75
    far = torch.tensor([1.5, 2.0, 3.0, 4.0], dtype=torch.bfloat16)
    r = parity.compare_exact({"w": a}, {"w": far})
    assert not r["ok"] and r["mismatch_fraction"] == 0.25 and r["max_ulps"] == 64


def test_ties_mismatch_only_at_tied_threshold_entries_is_parity():
    base = torch.zeros(8)
    # |τ| = 3, 2, 2, 1, ...: density 0.25 keeps 2 entries; entries 1 and 2 tie at the threshold
    expert = torch.tensor([3.0, 2.0, -2.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    ambiguous = parity.ties_tie_positions(base, [expert], 0.25)
    assert ambiguous.tolist() == [False, True, True, False, False, False, False, False]
    ours = torch.tensor([3.0, 2.0, 0.0, 0, 0, 0, 0, 0]).to(torch.bfloat16)
    theirs = torch.tensor([3.0, 0.0, -2.0, 0, 0, 0, 0, 0]).to(torch.bfloat16)
    inputs = ({"w": base}, [{"w": expert}], 0.25)
    r = parity.compare_exact({"w": ours}, {"w": theirs}, inputs)
    assert r["ok"] and r["mismatch_fraction"] == 0.25 and r["unexplained_mismatch_fraction"] == 0
    wrong = theirs.clone()
    wrong[0] = 1.0
    assert not parity.compare_exact({"w": ours}, {"w": wrong}, inputs)["ok"]


def test_statistical_parity_detects_a_different_drop_rate():
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.zeros(200, 100)}
    tau = torch.randn(200, 100, generator=g)

    def dropped(p, seed):
        keep = torch.rand(200, 100, generator=torch.Generator().manual_seed(seed)) < p
        return {"w": torch.where(keep, tau / p, 0.0)}

    assert parity.compare_statistical(dropped(0.5, 1), dropped(0.5, 2), base)["ok"]
    assert not parity.compare_statistical(dropped(0.5, 1), dropped(0.3, 2), base)["ok"]


def _entry(shape="tiny", cases=("ties",), wall=2.0):
    tool = {"runs": 1, "failed": 0, "wall_s": wall, "run_s": wall / 2, "import_s": 0.5, "cpu_s": wall,
            "peak_rss_bytes": 2**30, "samples": [], "input_GBps": 1.0, "s_per_Bparams": 3.0, "floor_ratio": 4.0}
    return {
        "shape": SHAPES[shape].describe(), "device": "cpu", "created": "2025-01-01T00:00:00+00:00",
        "machine": {"cpu_model": "X", "cpu_cores": 2, "ram_bytes": 2**34, "gpu": None, "torch": "2.13.0",
                    "mergekit": "0.1.5", "git_commit": "abc", "git_dirty": False},
        "settings": {"repeats": 1, "cache": ["warm"], "precisions": ["stored"]},
        "results": [{"case": c, "precision": "stored", "cache": "warm", "floor": {**tool, "run_s": 0.25, "wall_s": 1.0},
                     "tritonmerge": tool, "mergekit": {**tool, "wall_s": 10 * wall},
                     "vs_mergekit": {"wall_speedup": 10.0, "run_speedup": 10.0, "rss_ratio": 0.5}} for c in cases],
    }


def test_save_entry_replaces_only_rerun_cases(tmp_path):
    path = tmp_path / "e2e_cpu.json"
    save_entry(path, _entry(cases=("task_arithmetic", "ties")))
    save_entry(path, _entry(cases=("ties",), wall=5.0))
    save_entry(path, _entry(shape="150m", cases=("ties",)))
    runs = json.loads(path.read_text())["runs"]
    assert [r["shape"]["name"] for r in runs] == ["tiny", "150m"]
    tiny = {r["case"]: r["tritonmerge"]["wall_s"] for r in runs[0]["results"]}
    assert tiny == {"task_arithmetic": 2.0, "ties": 5.0}


def test_render_table_and_readme_markers(tmp_path):
    (tmp_path / "e2e_cpu.json").write_text(json.dumps({"schema": 1, "runs": [_entry()]}))
    runs = render.load_results(tmp_path)
    text = render.table(runs)
    assert "| ties | stored | warm | 1 | 2.00 |" in text and "10.0×" in text
    readme = "# x\n\nintro\n\n<!-- perf:start -->\nold\n<!-- perf:end -->\n\ntail\n"
    updated = render.replace_between_markers(readme, "NEW")
    assert "old" not in updated and "NEW" in updated and updated.endswith("tail\n")
    assert render.replace_between_markers("# x\n", "NEW").count(render.START) == 1


def test_chart_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    path = render.chart([_entry()], tmp_path / "c.png")
    assert path.stat().st_size > 1000
