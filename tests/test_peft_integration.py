"""tritonmerge inside PEFT (tritonmerge/integrations/peft.py, docs/peft.md).

peft is not in the project's virtualenv: the comparisons run in mergekit's (peft 0.21.2,
transformers 5.x; benchmarks/e2e/setup_mergekit.sh, TRITONMERGE_MERGEKIT_PYTHON in CI) in ONE
subprocess with PYTHONPATH at this checkout, which prints every measured number as JSON; the tests
below assert on them (and skip, with the reason, where that virtualenv or peft is absent).

* Deterministic drop-ins (task_arithmetic, magnitude_prune, ties with "total" and "frequency")
  against peft.utils.merge_utils for equal, unequal and mixed-sign weights (float32 weight
  tensors, as add_weighted_adapter passes): float32 and bfloat16 task tensors, **0 ulp** (equal
  bits, equal dtype). The bfloat16 inputs have distinct magnitudes: where |τ| ties at the k-th
  largest, torch.topk's choice is not ours (lowest index), and a separate check shows the
  results then differ at tied entries only. With bfloat16 *weights* PEFT rounds its products
  and sums to bfloat16 on the way; ours rounds once: within 2 bfloat16 ulps of Σ|wᵢτᵢ| (2⁻⁶ of it).
* DARE (random): the same statistics, with tolerances from the sample size (z-scores below 5):
  kept share, unbiasedness (E[out] = Σwᵢτᵢ, slope test with its exact standard error), and equal
  means of out, out² and [out ≠ 0] between the tools (paired per entry).
* The patch: model.add_weighted_adapter on a tiny random LlamaForCausalLM with two random LoRA
  adapters (no downloads, HF_HUB_OFFLINE=1) gives the same adapter patched and unpatched (ties,
  magnitude_prune, linear, svd, ties_svd, magnitude_prune_svd: equal bits; dare_ties/dare_linear
  run, repeat under torch.manual_seed); every rebound name is restored by identity afterwards.
* tritonmerge's add_weighted_adapter with wudi and ties (and tadrop, lwptv, ties at model scope,
  whose analyses run over all LoRA layers) reports a write-back error per LoRA layer;
  at full rank it is ~0; task arithmetic at rank r₁+r₂ equals peft's own svd combination and, read
  back through peft's get_delta_weight, Σwᵢ·ΔWᵢ (also with rsLoRA and fan_in_fan_out); layers and
  variants it cannot write back are refused naming them, and a failure removes the new adapter.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch

from tritonmerge.errors import InputError

from _mergekit import MERGEKIT_PYTHON, offline_env

REPO = Path(__file__).resolve().parents[1]

_SCRIPT = textwrap.dedent(
    r'''
    import contextlib, copy, json, math, sys, time, warnings
    import torch
    warnings.simplefilter("ignore")
    t0 = time.time()
    from peft.utils import merge_utils as mu
    import peft.tuners.lora.model as lora_mod
    from tritonmerge.integrations import peft as tp

    R = {}

    def ordered(x):
        i = x.to(torch.float32).contiguous().view(torch.int32).to(torch.int64)
        return torch.where(i < 0, -(i & 0x7FFFFFFF), i)

    def ulp(a, b):  # float32 ulps (bfloat16 values are float32 values)
        return int((ordered(a) - ordered(b)).abs().max()) if a.numel() else 0

    g = torch.Generator().manual_seed(0)
    # 1536 bfloat16 magnitudes, all distinct: no ties at any top-k boundary
    MAGS = torch.cat([2.0 ** e * (1 + torch.arange(128) / 128) for e in range(-6, 6)])

    def distinct(shape, dtype):
        n = math.prod(shape)
        v = MAGS[torch.randperm(MAGS.numel(), generator=g)[:n]]
        s = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
        return (v * s).reshape(shape).to(dtype)

    WEIGHTS = {"equal": [1.0, 1.0, 1.0], "unequal": [0.7, 0.2, 1.3], "mixed": [1.0, -0.6, 0.4], "zero": [0.5, 0.0, -1.5]}
    CALLS = {
        "task_arithmetic": ("task_arithmetic", ()),
        "magnitude_prune": ("magnitude_prune", (0.3,)),
        "ties_total": ("ties", (0.3, "total")),
        "ties_frequency": ("ties", (0.3, "frequency")),
        "ties_dense": ("ties", (1.0, "total")),
        "ties_nothing_kept": ("ties", (1e-4, "total")),
    }

    # -- deterministic functions: exact ----------------------------------------------------
    exact = {}
    for dname, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        for wname, wl in WEIGHTS.items():
            ts = [distinct((32, 48), dtype) for _ in range(3)]
            w = torch.tensor(wl)
            for cname, (fn, args) in CALLS.items():
                a = getattr(mu, fn)(ts, w, *args)
                b = getattr(tp, fn)(ts, w, *args)
                exact[f"{cname}/{dname}/{wname}"] = {"same_dtype": a.dtype == b.dtype, "ulp": ulp(a, b), "dtype": str(b.dtype)}
    R["exact"] = exact

    # natural bfloat16 data: ties at the k-th magnitude; differences only at the tied entries
    tied = {"only_at_ties": True, "tied_entries": 0, "differing": 0, "same_count": True}
    for trial in range(4):
        t = torch.randn(64, 48, generator=g).to(torch.bfloat16)
        a = mu.magnitude_prune([t], torch.tensor([1.0]), 0.3)
        b = tp.magnitude_prune([t], torch.tensor([1.0]), 0.3)
        k = int(0.3 * t.numel())
        kth = t.abs().float().flatten().topk(k).values[-1]
        at_kth = t.abs().float() == kth
        diff = a != b
        tied["only_at_ties"] &= not bool((diff & ~at_kth).any())
        tied["tied_entries"] += int(at_kth.sum())
        tied["differing"] += int(diff.sum())
        tied["same_count"] &= int((a != 0).sum()) == int((b != 0).sum())
    R["bf16_ties"] = tied

    # bfloat16 weights: PEFT rounds products/sums to bfloat16 on the way, we round once
    lowp = {}
    for wname, wl in WEIGHTS.items():
        ts = [distinct((32, 48), torch.bfloat16) for _ in range(3)]
        w = torch.tensor(wl, dtype=torch.bfloat16)
        scale = sum(abs(float(wi)) * t.double().abs() for wi, t in zip(w, ts))
        for cname in ("task_arithmetic", "magnitude_prune", "ties_total", "ties_frequency"):
            fn, args = CALLS[cname]
            a = getattr(mu, fn)(ts, w, *args)
            b = getattr(tp, fn)(ts, w, *args)
            rel = float(((a.double() - b.double()).abs() / scale.clamp(min=1e-30)).max())
            lowp[f"{cname}/{wname}"] = {"same_dtype": a.dtype == b.dtype, "rel": rel}
    R["bf16_weights"] = lowp

    # -- DARE: the same statistics ------------------------------------------------------------
    N, P = 256 * 256, 0.3
    dare = {}
    for dname, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        ts = [torch.randn(256, 256, generator=g).to(dtype) for _ in range(3)]
        wl = [0.7, -0.4, 1.2]
        w = torch.tensor(wl)
        target = sum(wi * t.double() for wi, t in zip(wl, ts))
        var = sum(wi ** 2 * t.double() ** 2 for wi, t in zip(wl, ts)) * (1 - P) / P
        torch.manual_seed(5)
        for fn, extra in (("dare_linear", ()), ("dare_ties", ("total",)), ("dare_ties", ("frequency",))):
            key = f"{fn}{'_' + extra[0] if extra else ''}/{dname}"
            a = getattr(mu, fn)(ts, w, P, *extra)
            b = getattr(tp, fn)(ts, w, P, *extra)
            row = {"same_dtype": a.dtype == b.dtype}
            for sname, f in (("mean", lambda x: x), ("square", lambda x: x * x), ("nonzero", lambda x: (x != 0).double())):
                d = f(a.double()) - f(b.double())
                row[f"z_{sname}"] = float(d.mean() / (d.pow(2).mean() / N).sqrt())
            for impl, label in ((mu, "peft"), (tp, "tm")):
                out = getattr(impl, fn)([ts[0]], torch.tensor([1.0]), P, *extra)
                row[f"z_share_{label}"] = float(((out != 0).double().mean() - P) / math.sqrt(P * (1 - P) / N))
            if fn == "dare_linear":
                for label, out in (("peft", a), ("tm", b)):
                    tt = (target * target).sum()
                    beta = (out.double() * target).sum() / tt
                    row[f"z_slope_{label}"] = float((beta - 1) / ((target * target * var).sum().sqrt() / tt))
            torch.manual_seed(11)
            again1 = getattr(tp, fn)(ts, w, P, *extra)
            again2 = getattr(tp, fn)(ts, w, P, *extra)
            torch.manual_seed(11)
            again3 = getattr(tp, fn)(ts, w, P, *extra)
            row["repeats_under_seed"] = torch.equal(again1, again3)
            row["fresh_masks_per_call"] = not torch.equal(again1, again2)
            dare[key] = row
    R["dare"] = dare

    # -- the patch and add_weighted_adapter on a tiny llama -----------------------------------
    from transformers import LlamaConfig, LlamaForCausalLM
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    base_model = LlamaForCausalLM(cfg)
    TARGETS = ["q_proj", "v_proj", "down_proj", "embed_tokens"]

    def tiny(dtype):
        m = copy.deepcopy(base_model).to(dtype)
        pm = get_peft_model(m, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False), adapter_name="math")
        pm.add_adapter("code", LoraConfig(r=4, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False))
        with torch.no_grad():  # random factors with distinct magnitudes in every tensor (no top-k ties)
            for name, p in pm.named_parameters():
                if "lora_" in name:
                    p.copy_(distinct(tuple(p.shape), torch.float32) * 0.1)
        return pm

    originals = {(m.__name__, n): vars(m)[n] for m in (lora_mod, mu) for n in tp.PATCHED_NAMES}

    def restored():
        return all(vars(sys.modules[m])[n] is f for (m, n), f in originals.items())

    def adapter_tensors(pm, name):
        return {k.replace(name, "<new>"): v for k, v in pm.state_dict().items() if f".{name}." in k or k.endswith(f".{name}")}

    patch = {}
    for dname, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        pm = tiny(dtype)
        for ct in ("ties", "magnitude_prune", "linear", "svd", "ties_svd", "magnitude_prune_svd", "dare_ties", "dare_linear"):
            kw = {} if ct in ("linear", "svd") else {"density": 0.5}
            pm.add_weighted_adapter(["math", "code"], [0.8, -0.5], f"ref_{ct}", combination_type=ct, **kw)
            with tp.patched():
                rebound = lora_mod.ties is tp.ties and lora_mod.dare_ties is tp.dare_ties
                torch.manual_seed(3)
                pm.add_weighted_adapter(["math", "code"], [0.8, -0.5], f"tm_{ct}", combination_type=ct, **kw)
                if ct.startswith("dare"):
                    torch.manual_seed(3)
                    pm.add_weighted_adapter(["math", "code"], [0.8, -0.5], f"tm2_{ct}", combination_type=ct, **kw)
            ref, ours = adapter_tensors(pm, f"ref_{ct}"), adapter_tensors(pm, f"tm_{ct}")
            row = {"rebound": rebound, "restored": restored(), "tensors": len(ref), "same_keys": ref.keys() == ours.keys()}
            if ct.startswith("dare"):
                again = adapter_tensors(pm, f"tm2_{ct}")
                row["repeats_under_seed"] = all(torch.equal(ours[k], again[k]) for k in ours)
                row["finite"] = all(bool(torch.isfinite(v).all()) for v in ours.values())
            else:
                row["equal"] = sum(torch.equal(ref[k], ours[k]) for k in ref)
                row["ulp"] = max(ulp(ref[k], ours[k]) for k in ref)
            patch[f"{ct}/{dname}"] = row

    # enable/disable, nesting, exceptions
    life = {}
    tp.enable(); life["enabled"] = lora_mod.ties is tp.ties and mu.ties is tp.ties
    tp.enable(); tp.disable(); life["enable_twice_then_disable"] = restored()
    tp.enable()
    with tp.patched():
        pass
    life["patched_inside_enable_keeps_it"] = lora_mod.ties is tp.ties
    tp.disable(); life["disable"] = restored()
    tp.disable(); life["disable_twice"] = restored()
    with contextlib.suppress(ZeroDivisionError):
        with tp.patched():
            1 / 0
    life["restored_after_exception"] = restored()
    R["patch"] = patch
    R["lifecycle"] = life

    # -- tritonmerge's add_weighted_adapter -----------------------------------------------------
    awa = {}
    for dname, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        pm = tiny(dtype)
        layers = sorted({n for n, m in pm.named_modules() if hasattr(m, "lora_A") and "math" in (set(m.lora_A) | set(m.lora_embedding_A))})
        for label, method, rank, params in (
            ("wudi", "wudi", None, {}),
            ("ties", "ties", None, {"density": 0.3}),
            ("ties_full", "ties", 64, {"density": 0.3}),
            ("wudi_full", "wudi", 64, {}),
            ("ta_sum_of_ranks", "task_arithmetic", 8, {}),
        ):
            r = tp.add_weighted_adapter(pm, ["math", "code"], [0.8, -0.5], f"tm_{label}", method=method, svd_rank=rank, **params)
            row = {"rank": r.rank, "layers": sorted(r.errors) == sorted(n.removeprefix("base_model.model.") for n in layers),
                   "n_layers": len(r.errors), "max_error": r.max_error,
                   "finite": all(math.isfinite(e) for e in r.errors.values())}
            # the stored adapter reproduces the reported error against the merged ΔW it came from
            awa[f"{label}/{dname}"] = row
        pm.add_weighted_adapter(["math", "code"], [0.8, -0.5], "peft_svd", combination_type="svd", svd_rank=8)
        worst = 0.0
        for n, m in pm.named_modules():
            if hasattr(m, "lora_A") and ("peft_svd" in m.lora_A or "peft_svd" in m.lora_embedding_A):
                a = m.get_delta_weight("peft_svd").double()
                b = m.get_delta_weight("tm_ta_sum_of_ranks").double()
                worst = max(worst, float((a - b).norm() / a.norm()))
        awa[f"vs_peft_svd/{dname}"] = {"rel": worst}
        errors = {}
        for label, call in (
            ("unknown_adapter", lambda: tp.add_weighted_adapter(pm, ["math", "nope"], [1, 1], "x")),
            ("existing_name", lambda: tp.add_weighted_adapter(pm, ["math", "code"], [1, 1], "tm_wudi")),
            ("weights_count", lambda: tp.add_weighted_adapter(pm, ["math", "code"], [1], "y")),
            ("bad_param", lambda: tp.add_weighted_adapter(pm, ["math", "code"], [1, 1], "z", method="ties", densty=0.3)),
        ):
            try:
                call()
                errors[label] = "no error"
            except Exception as exc:
                errors[label] = f"{type(exc).__name__}: {exc}"
        errors["left_no_adapter"] = not any(n in pm.peft_config for n in ("x", "y", "z"))
        awa[f"errors/{dname}"] = errors
    R["awa"] = awa

    # refusals of what cannot be written back, rsLoRA scaling, clean-up after a failure
    from torch import nn

    more = {}

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.lin = nn.Conv2d(3, 8, 3), nn.Linear(8, 4)

    def error_of(call):
        try:
            call()
            return "no error"
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"

    net = get_peft_model(Net(), LoraConfig(r=2, target_modules=["conv", "lin"], init_lora_weights=False), adapter_name="p")
    net.add_adapter("q", LoraConfig(r=2, target_modules=["conv", "lin"], init_lora_weights=False))
    more["conv"] = error_of(lambda: tp.add_weighted_adapter(net, ["p", "q"], [1, 1], "n", method="ties", density=0.5))
    small = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2)
    dora = get_peft_model(LlamaForCausalLM(small), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True, init_lora_weights=False), adapter_name="p")
    dora.add_adapter("q", LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    more["dora"] = error_of(lambda: tp.add_weighted_adapter(dora, ["p", "q"], [1, 1], "n", method="ties", density=0.5))
    rs = get_peft_model(LlamaForCausalLM(small), LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"], init_lora_weights=False), adapter_name="p")
    rs.add_adapter("q", LoraConfig(r=2, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    r = tp.add_weighted_adapter(rs, ["p", "q"], [0.8, -0.5], "n", method="task_arithmetic", svd_rank=6)
    worst = 0.0
    for mod in rs.modules():
        if hasattr(mod, "lora_A") and "n" in mod.lora_A:  # peft's own ΔW of the new adapter vs Σ wᵢΔWᵢ
            want = 0.8 * mod.get_delta_weight("p").double() - 0.5 * mod.get_delta_weight("q").double()
            worst = max(worst, float((mod.get_delta_weight("n").double() - want).norm() / want.norm()))
    more["rslora"] = {"reported": r.max_error, "peft_delta_rel": worst}
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt = get_peft_model(
        GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=1, n_head=4, bos_token_id=0, eos_token_id=0)),
        LoraConfig(r=2, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, init_lora_weights=False), adapter_name="p",
    )
    gpt.add_adapter("q", LoraConfig(r=3, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, init_lora_weights=False))
    r = tp.add_weighted_adapter(gpt, ["p", "q"], [0.8, -0.5], "n", method="task_arithmetic", svd_rank=5)
    worst = 0.0
    for mod in gpt.modules():
        if hasattr(mod, "lora_A") and "n" in mod.lora_A:
            want = 0.8 * mod.get_delta_weight("p").double() - 0.5 * mod.get_delta_weight("q").double()
            worst = max(worst, float((mod.get_delta_weight("n").double() - want).norm() / want.norm()))
    more["fan_in_fan_out"] = {"reported": r.max_error, "peft_delta_rel": worst, "layers": len(r.errors)}
    real = tp._write_back
    tp._write_back = lambda *a, **k: 1 / 0
    more["failure"] = error_of(lambda: tp.add_weighted_adapter(rs, ["p", "q"], [1, 1], "broken", method="task_arithmetic"))
    tp._write_back = real
    more["failure_cleaned_up"] = "broken" not in rs.peft_config and not any("broken" in getattr(m, "lora_A", {}) for m in rs.modules())
    # whole-model methods: their analyses see every LoRA layer at once
    pm = tiny(torch.float32)
    for method, params, key in (
        ("tadrop", {"merge_method": "ties", "density": 0.3}, "tadrop"),
        ("lwptv", {"merge_method": "ties", "density": 0.3}, "lwptv"),
        ("ties", {"density": 0.3, "topk_scope": "model"}, "ties_model_topk"),
    ):
        r = tp.add_weighted_adapter(pm, ["math", "code"], [1.0, 0.7], f"tm_{method}", method=method, **params)
        more[f"whole_model/{method}"] = {
            "layers": len(r.errors), "finite": all(math.isfinite(e) for e in r.errors.values()),
            "analysed": key in r.report.decisions.summary,
        }
    R["more"] = more
    R["seconds"] = time.time() - t0
    print("RESULTS " + json.dumps(R))
    '''
)


def _peer_python_has_peft() -> str | None:
    if not MERGEKIT_PYTHON.exists():
        return f"mergekit's virtualenv is not there ({MERGEKIT_PYTHON}); make it with benchmarks/e2e/setup_mergekit.sh"
    proc = subprocess.run([str(MERGEKIT_PYTHON), "-c", "import peft, transformers"], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        return f"peft/transformers are not importable from {MERGEKIT_PYTHON}: {proc.stderr.strip().splitlines()[-1:]}"
    return None


@pytest.fixture(scope="module")
def results():
    why = _peer_python_has_peft()
    if why:
        pytest.skip(why)
    proc = subprocess.run(
        [str(MERGEKIT_PYTHON), "-c", _SCRIPT], capture_output=True, text=True, timeout=300,
        env=offline_env(str(REPO)), cwd=REPO,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULTS ")]
    assert lines, f"the peft comparison did not run:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1][len("RESULTS "):])


# -- in the peer virtualenv (peft) ---------------------------------------------------------------


def test_deterministic_functions_equal_peft_bit_for_bit(results):
    rows = results["exact"]
    assert len(rows) == 2 * 4 * 6
    bad = {k: v for k, v in rows.items() if not v["same_dtype"] or v["ulp"] != 0}
    assert not bad, bad
    assert rows["ties_total/bfloat16/equal"]["dtype"] == "torch.float32"  # PEFT's promotion, kept


def test_bf16_differences_only_where_magnitudes_tie_at_the_threshold(results):
    r = results["bf16_ties"]
    assert r["only_at_ties"] and r["same_count"], r
    assert r["tied_entries"] > 0  # the data did have ties


def test_bf16_weights_within_bf16_rounding(results):
    rows = results["bf16_weights"]
    bad = {k: v for k, v in rows.items() if not v["same_dtype"] or v["rel"] > 2.0**-6}
    assert not bad, bad


def test_dare_has_peft_statistics(results):
    rows = results["dare"]
    assert len(rows) == 6
    for key, row in rows.items():
        assert row["same_dtype"], key
        zs = {k: v for k, v in row.items() if k.startswith("z_")}
        assert all(abs(z) < 5 for z in zs.values()), (key, zs)
        assert row["repeats_under_seed"] and row["fresh_masks_per_call"], (key, row)
    assert "z_slope_tm" in rows["dare_linear/float32"]


def test_patched_add_weighted_adapter_equals_unpatched(results):
    rows = results["patch"]
    for key, row in rows.items():
        assert row["rebound"] and row["restored"] and row["same_keys"] and row["tensors"] > 0, (key, row)
        if key.startswith("dare"):
            assert row["repeats_under_seed"] and row["finite"], (key, row)
        else:
            assert row["equal"] == row["tensors"] and row["ulp"] == 0, (key, row)


def test_patch_is_undone(results):
    assert all(results["lifecycle"].values()), results["lifecycle"]


def test_tritonmerge_add_weighted_adapter_reports_write_back_errors(results):
    rows = results["awa"]
    for dtype in ("float32", "bfloat16"):
        for label in ("wudi", "ties", "ties_full", "wudi_full", "ta_sum_of_ranks"):
            row = rows[f"{label}/{dtype}"]
            assert row["layers"] and row["n_layers"] == 7 and row["finite"], (label, dtype, row)
        assert rows[f"wudi/{dtype}"]["rank"] == 4  # the largest adapter rank
        assert 0 < rows[f"ties/{dtype}"]["max_error"] < 1  # a rank-4 adapter cannot hold the merged ΔW
    # full rank: only rounding is left (float32 storage; bfloat16 storage for bf16 adapters)
    for label in ("ties_full", "wudi_full"):
        assert rows[f"{label}/float32"]["max_error"] < 1e-5
        assert rows[f"{label}/bfloat16"]["max_error"] < 1e-2
    assert rows["ta_sum_of_ranks/float32"]["max_error"] < 1e-5
    assert rows["vs_peft_svd/float32"]["rel"] < 1e-5
    assert rows["vs_peft_svd/bfloat16"]["rel"] < 1e-2


def test_tritonmerge_add_weighted_adapter_errors_name_the_fault(results):
    for dtype in ("float32", "bfloat16"):
        e = results["awa"][f"errors/{dtype}"]
        assert e["unknown_adapter"].startswith("InputError") and "'nope'" in e["unknown_adapter"], e
        assert e["existing_name"].startswith("InputError") and "'tm_wudi'" in e["existing_name"], e
        assert e["weights_count"].startswith("InputError") and "2 adapters but 1 weights" in e["weights_count"], e
        assert e["bad_param"].startswith("ParameterError") and "densty" in e["bad_param"], e
        assert all("\n" not in str(v) for v in e.values())
        assert e["left_no_adapter"]


def test_refusals_rslora_and_clean_up(results):
    m = results["more"]
    assert m["conv"] == (
        "InputError: add_weighted_adapter: layer 'conv' is a Conv2d; tritonmerge writes back LoRA Linear and Embedding layers only"
    )
    assert m["dora"].startswith("InputError: add_weighted_adapter: adapter 'p' is a LoRA variant (e.g. DoRA) at layer 'model.layers.0.self_attn.q_proj'")
    # rsLoRA (scaling α/√r): peft's own ΔW of the written adapter is Σ wᵢΔWᵢ at rank r₁ + r₂
    assert m["rslora"]["reported"] < 1e-5 and m["rslora"]["peft_delta_rel"] < 1e-5, m["rslora"]
    assert m["failure"].startswith("ZeroDivisionError") and m["failure_cleaned_up"]
    for method in ("tadrop", "lwptv", "ties"):
        assert m[f"whole_model/{method}"] == {"layers": 7, "finite": True, "analysed": True}, method
    # GPT-2's Conv1D (fan_in_fan_out): the same, through peft's own transposing get_delta_weight
    f = m["fan_in_fan_out"]
    assert f["layers"] == 2 and f["reported"] < 1e-5 and f["peft_delta_rel"] < 1e-5, f


def test_one_subprocess_is_quick(results):
    assert results["seconds"] < 50


# -- in this virtualenv (no peft needed) ---------------------------------------------------------


def _peft_formula(taus, weights, method):
    """PEFT's TIES combine in float64, written out: unweighted election, count divisor."""
    stack = torch.stack([t.double() for t in taus])
    votes = stack.sum(0) if method == "total" else stack.sign().sum(0)
    agree = stack.sign() == torch.where(votes >= 0, 1.0, -1.0)
    w = torch.tensor(weights, dtype=torch.float64).view(-1, 1, 1)
    return (stack * w * agree).sum(0) / agree.sum(0).clamp(min=1)


@pytest.mark.parametrize("election,method", [("unweighted_sum", "total"), ("unweighted_count", "frequency")])
@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [0.7, -1.3, 0.4], [0.0, -2.0, 1.0]])
def test_unweighted_elections_in_the_ties_family(election, method, weights):
    import tritonmerge

    g = torch.Generator().manual_seed(1)
    base = torch.randn(24, 40, generator=g)
    experts = [base + torch.randn(24, 40, generator=g) for _ in range(3)]
    out = tritonmerge.merge_tensors(
        "ties", base, experts, weight=weights, density=1.0, consensus=election, disjoint="mean", normalize=False
    )
    want = base.double() + _peft_formula([e - base for e in experts], weights, method)
    assert torch.allclose(out.double(), want, rtol=1e-5, atol=1e-5)
    if any(w < 0 for w in weights):  # the weighted election is a different rule here
        other = tritonmerge.merge_tensors(
            "ties", base, experts, weight=weights, density=1.0, consensus=election.removeprefix("unweighted_"),
            disjoint="mean", normalize=False,
        )
        assert not torch.allclose(other, out)


def test_fused_executors_decline_the_unweighted_elections():
    from tritonmerge.backends.cpu.merge import SUPPORTED_ELECTIONS as CPU
    from tritonmerge.backends.cpu.merge import merge_cpu_reasons
    from tritonmerge.backends.triton.merge import SUPPORTED_ELECTIONS as TRITON
    from tritonmerge.ops.merge_spec import Elect, ExpertRule, MergeSpec

    for elect in (Elect.UNWEIGHTED_SUM, Elect.UNWEIGHTED_COUNT):
        assert elect not in CPU and elect not in TRITON
        spec = MergeSpec(experts=(ExpertRule(1.0), ExpertRule(-1.0)), elect=elect)
        t = torch.zeros(4, 4)
        assert any(elect.name in reason for reason in merge_cpu_reasons(spec, t, [t, t]))


def test_drop_in_functions_refuse_bad_arguments_in_one_line():
    from tritonmerge.integrations import peft as tp

    t = [torch.randn(4, 4), torch.randn(4, 4)]
    with pytest.raises(InputError, match=r"weights must hold one number per task tensor \(shape \[2\]\)"):
        tp.task_arithmetic(t, torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(InputError, match="task tensor 1 has shape"):
        tp.ties([t[0], torch.randn(2, 2)], torch.tensor([1.0, 1.0]), 0.5)
    with pytest.raises(ValueError, match="density should be >= 0"):
        tp.magnitude_prune(t, torch.tensor([1.0, 1.0]), -0.1)
    with pytest.raises(TypeError, match="density must be a number"):
        tp.ties(t, torch.tensor([1.0, 1.0]), None)
    with pytest.raises(RuntimeError, match="majority_sign_method 'mass'"):
        tp.dare_ties(t, torch.tensor([1.0, 1.0]), 0.5, "mass")
    with pytest.raises(ValueError, match="density 0 drops every entry"):
        tp.dare_linear(t, torch.tensor([1.0, 1.0]), 0.0)
    with pytest.warns(UserWarning, match="no pruning will be performed"):
        dense = tp.ties(t, torch.tensor([1.0, 1.0]), 1.5)
    assert dense.shape == (4, 4)


def test_enable_without_peft_says_so():
    from tritonmerge.integrations import peft as tp

    import importlib.util

    if importlib.util.find_spec("peft") is not None:
        pytest.skip("peft is importable here; the peer-virtualenv tests cover enable()")
    with pytest.raises(tp.PeftMissingError, match="pip install 'tritonmerge\\[peft\\]'"):
        tp.enable()
    assert not tp.is_enabled()
