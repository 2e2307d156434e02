"""Zero-copy reads and the NaN/Inf input check that rides on the fused loops' own reads.

The reader maps tensors instead of copying them, and the engine counts NaN/Inf in the pass the
fused CPU merge (or an analysis's fused statistics) makes anyway; inputs those loops do not read
(the base of ``linear``, methods without a fused loop) are checked exactly instead. Every path
must still refuse a poisoned input with the one-line error naming model, file and tensor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from _checkpoints import load_folder, make_tiny, write_config
from tritonmerge.backends.cpu import kernels as ck
from tritonmerge.engine import MergeOptions, run_merge
from tritonmerge.errors import CheckpointError, NonFiniteInputError
from tritonmerge.io.index import open_checkpoint
from tritonmerge.io.reader import TensorReader

QUIET = dict(quiet=True, out_shard_size="20KB")
POISONED = "model.layers.1.mlp.up_proj.weight"

needs_kernels = pytest.mark.skipif(ck.status() is not None, reason="fused CPU kernels unavailable")


def poison(model: Path, name: str = POISONED, value: float = float("nan"), index: int = 5) -> str:
    weight_map = json.loads((model / "model.safetensors.index.json").read_text())["weight_map"]
    path = model / weight_map[name]
    tensors = load_file(str(path))
    tensors[name].view(-1)[index] = value
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path.name


def test_mapped_reads_equal_copied_reads_and_outlive_the_reader(tmp_path):
    base, _ = make_tiny(tmp_path)
    ix = open_checkpoint(base, "base model 'b'")
    with TensorReader(mapped=False) as copied:
        want = {n: copied.read(info) for n, info in ix.tensors.items()}
        rows = {n: copied.read(info, (1, 3)) for n, info in ix.tensors.items() if len(info.shape) == 2}
    reader = TensorReader()
    got = {n: reader.read(info) for n, info in ix.tensors.items()}
    got_rows = {n: reader.read(info, (1, 3)) for n, info in ix.tensors.items() if len(info.shape) == 2}
    reader.close()  # the mappings belong to the tensors, not to the reader
    for n in want:
        assert got[n].dtype == want[n].dtype and torch.equal(got[n], want[n]), n
    for n in rows:
        assert torch.equal(got_rows[n], rows[n]), n
    # private mappings: writing to a tensor never reaches the file
    name = next(n for n in got if got[n].dtype == torch.bfloat16)
    got[name].fill_(7)
    assert torch.equal(load_folder(base)[name], want[name])


def test_file_truncated_after_planning_is_named(tmp_path):
    base, _ = make_tiny(tmp_path)
    ix = open_checkpoint(base, "base model 'b'")
    info = max(ix.tensors.values(), key=lambda i: i.start + i.nbytes)
    data = info.file.read_bytes()
    info.file.write_bytes(data[: info.start + info.nbytes // 2])
    with TensorReader() as reader, pytest.raises(CheckpointError, match=r"base model 'b'.*ended while reading tensor.*truncated"):
        reader.read(info, None, "base model 'b'")


@needs_kernels
def test_tau_stats_gram_equals_stats_and_gram():
    from tritonmerge.methods.lwptv import gram_matrix

    torch.manual_seed(0)
    for numel, dtype in ((1000, torch.bfloat16), (300_001, torch.float16), (70_000, torch.float32)):
        base = torch.randn(numel).to(dtype)
        experts = [(base.float() + torch.randn(numel) * 0.1).to(dtype) for _ in range(3)]
        stats, gram = ck.tau_stats_gram(base, experts)
        assert torch.equal(stats, ck.tau_stats(base, experts))
        ref = gram_matrix(base, experts)
        assert torch.allclose(gram, ref, rtol=1e-12, atol=0) and torch.equal(gram, gram.T)
        for threads in (1, 3):
            assert torch.equal(ck.tau_stats_gram(base, experts, threads=threads)[1], gram)


@needs_kernels
def test_merge_counts_nonfinite_inputs_it_reads():
    base = torch.randn(5000).to(torch.bfloat16)
    experts = [(base.float() + 0.01).to(torch.bfloat16) for _ in range(2)]
    out = torch.empty_like(base)

    def run(pruned: bool):
        a, alive = ck.make_args(base, [experts[0], None if pruned else experts[1]], numel=base.numel())
        a.out, a.out_dtype, a.add_base, a.lambda_ = out.data_ptr(), ck.DTYPE_CODES[base.dtype], 1, 1.0
        audit = ck.start_audit()
        try:
            ck.merge(a)
        finally:
            ck.stop_audit(audit)
        return audit

    audit = run(False)
    assert audit.nonfinite == 0 and all(audit.covers(t) for t in (base, *experts))
    experts[1][4321] = float("inf")
    assert run(False).nonfinite > 0
    audit = run(True)  # a KEEP_NONE expert is not read: not covered, so the engine checks it
    assert audit.nonfinite == 0 and not audit.covers(experts[1]) and audit.covers(base)


@needs_kernels
@pytest.mark.parametrize("op", ["sign_agreement", "sign_counts"])
def test_cross_task_counts_check_the_inputs_they_read(op):
    """TADrop's default statistic and LwPTV's default score read base and experts whole: their
    pass is the NaN/Inf check of them."""
    base = torch.randn(70_000).to(torch.bfloat16)
    experts = [(base.float() + 0.01 * torch.randn(70_000)).to(torch.bfloat16) for _ in range(3)]
    count = (lambda: ck.sign_agreement(base, experts, [7_000] * 3)) if op == "sign_agreement" else (lambda: ck.sign_counts(base, experts))

    def run():
        audit = ck.start_audit()
        try:
            counts = count()
        finally:
            ck.stop_audit(audit)
        return audit, counts

    audit, clean = run()
    assert audit.nonfinite == 0 and all(audit.covers(t) for t in (base, *experts))
    assert clean == count()  # counts unchanged by the audit
    for bad, where in ((experts[2], 69_999), (base, 12)):
        saved = bad[where].clone()
        bad[where] = float("nan")
        assert run()[0].nonfinite == 1
        bad[where] = saved


CASES = {
    # the fused merge reads every input (the count comes from its own pass)
    "ties": ("ties", {"density": 0.3}, "expert"),
    # linear's kernel never reads the base: checked exactly
    "linear-base": ("linear", {}, "base"),
    # no keep rule or election can drop an entry: the merge's count of its own NaN/Inf output
    # is the check of what it read (merge_cpu.c output_reveals_inputs)
    "task_arithmetic-expert": ("task_arithmetic", {}, "expert"),
    "task_arithmetic-base": ("task_arithmetic", {"lambda": 0.0}, "base"),
    "linear-expert": ("linear", {"weight": 0.0, "normalize": False}, "expert"),
    # the analysis's fused statistics are the check (TADrop: stats; LwPTV: stats + Gram)
    "tadrop": ("tadrop", {"merge_method": "ties", "density": 0.3}, "expert"),
    "lwptv": ("lwptv", {"merge_method": "ties", "density": 0.3}, "expert"),
    # no fused loop at all
    "wudi": ("wudi", {"steps": 2}, "expert"),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nonfinite_input_refused_on_every_check_path(tmp_path, case, value):
    method, params, where = CASES[case]
    base, experts = make_tiny(tmp_path / "models")
    bad = base if where == "base" else experts[2]
    fname = poison(bad, value=value)
    cfg = write_config(tmp_path / "c.yml", method, base, experts, params)
    with pytest.raises(NonFiniteInputError) as err:
        run_merge(str(cfg), tmp_path / "out", MergeOptions(**QUIET))
    msg = str(err.value)
    assert str(bad) in msg and fname in msg and repr(POISONED) in msg
    assert ("1 NaN and 0 Inf" if value != value else "0 NaN and 1 Inf") in msg


def test_checked_merge_equals_unchecked_merge(tmp_path):
    base, experts = make_tiny(tmp_path / "models")
    for method, params in (("ties", {"density": 0.3}), ("linear", {}), ("task_arithmetic", {})):
        cfg = write_config(tmp_path / f"{method}.yml", method, base, experts, params)
        run_merge(str(cfg), tmp_path / f"a-{method}", MergeOptions(**QUIET))
        run_merge(str(cfg), tmp_path / f"b-{method}", MergeOptions(allow_nonfinite=True, **QUIET))
        a, b = load_folder(tmp_path / f"a-{method}"), load_folder(tmp_path / f"b-{method}")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
