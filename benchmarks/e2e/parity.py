"""Do two merged checkpoints agree? Exactly (within the output dtype's rounding) or statistically.

Exact parity: for every tensor, the two outputs may differ by at most one unit in the last place
(ulp) of the output dtype — both tools compute in float32 and round once, and a different
summation order may land on the neighbouring representable value. Larger differences are
counted as mismatches and reported as a fraction (for TIES they come from entries tied in |τ| at
the top-k threshold, where mergekit's unstable argsort and our lowest-index-first rule may keep
different entries).

Statistical parity (random drops, DARE): seeds differ between tools, so compare per-tensor
statistics of the merged task vector out − base: the fraction of entries left equal to the base,
and the mean and standard deviation of the deltas.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open


def _tensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for key in h.keys():
                yield key, h.get_tensor(key)


def load_all(folder: Path) -> dict[str, torch.Tensor]:
    return dict(_tensors(folder))


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` at |x| (x in float32): 2^(exponent − mantissa bits)."""
    mant = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}[dtype]
    tiny = torch.finfo(dtype).tiny
    _, exp = torch.frexp(x.abs().clamp_min(tiny))
    return torch.ldexp(torch.ones_like(x), (exp - 1 - mant).to(torch.int32))


def ties_tie_positions(base: torch.Tensor, experts: list[torch.Tensor], density: float) -> torch.Tensor:
    """Where per-tensor top-k is ambiguous: entries whose |τᵢ| (float32) equals expert i's k-th
    largest |τᵢ| (k = max(1, ⌊density·n⌋)), for any expert. Tools may keep different subsets of
    those entries (mergekit's argsort is not stable), so their outputs may differ there and only
    there."""
    b = base.float().flatten()
    n = b.numel()
    k = max(1, int(density * n))
    ambiguous = torch.zeros(n, dtype=torch.bool)
    if k >= n:
        return ambiguous.view(base.shape)
    for e in experts:
        mag = (e.float().flatten() - b).abs()
        threshold = torch.kthvalue(mag, n - k + 1).values
        ambiguous |= mag == threshold
    return ambiguous.view(base.shape)


def compare_exact(
    ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor],
    ties_inputs: tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]], float] | None = None,
) -> dict:
    """Counts of elements equal, within 1 ulp and beyond, over all tensors; the worst tensors.

    With ``ties_inputs`` (base, experts, density) mismatches at entries tied in |τ| at the top-k
    threshold (``ties_tie_positions``) are counted apart: parity holds when every mismatch is
    one of those."""
    if set(ours) != set(theirs):
        missing = sorted(set(theirs) - set(ours))[:5]
        extra = sorted(set(ours) - set(theirs))[:5]
        return {"ok": False, "error": f"different tensor names: missing {missing}, extra {extra}"}
    n = equal = within = beyond = unexplained = tied = 0
    max_ulps = 0.0
    worst: list[tuple[float, str]] = []
    dtypes = set()
    for name in sorted(ours):
        a, b = ours[name], theirs[name]
        dtypes.add(str(a.dtype))
        if a.shape != b.shape or a.dtype != b.dtype:
            return {"ok": False, "error": f"{name}: ours {tuple(a.shape)} {a.dtype}, theirs {tuple(b.shape)} {b.dtype}"}
        a32, b32 = a.float(), b.float()
        diff = (a32 - b32).abs()
        step = ulp(torch.maximum(a32.abs(), b32.abs()), a.dtype)
        ulps = diff / step
        n += a.numel()
        equal += int((diff == 0).sum())
        within += int((ulps <= 1).sum())
        bad = int((ulps > 1).sum())
        beyond += bad
        if ties_inputs is not None and a.is_floating_point() and a.dim() >= 1:
            tb, te, density = ties_inputs
            ambiguous = ties_tie_positions(tb[name], [x[name] for x in te], density)
            tied += int(ambiguous.sum())
            unexplained += int(((ulps > 1) & ~ambiguous).sum())
        else:
            unexplained += bad
        max_ulps = max(max_ulps, float(ulps.max()))
        if bad:
            worst.append((bad / a.numel(), name))
    worst.sort(reverse=True)
    report = {
        "ok": unexplained == 0,
        "elements": n,
        "dtypes": sorted(dtypes),
        "equal_fraction": equal / n,
        "within_1ulp_fraction": within / n,
        "mismatch_fraction": beyond / n,
        "max_ulps": max_ulps,
        "worst_tensors": [{"name": nm, "mismatch_fraction": f} for f, nm in worst[:5]],
    }
    if ties_inputs is not None:
        report["tied_at_threshold_fraction"] = tied / n
        report["unexplained_mismatch_fraction"] = unexplained / n
    return report


def delta_stats(out: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Per tensor: fraction of entries equal to the base, mean and std of out − base."""
    stats = {}
    for name, o in out.items():
        d = o.double() - base[name].double()
        stats[name] = {
            "unchanged_fraction": float((d == 0).double().mean()),
            "mean": float(d.mean()),
            "std": float(d.std()) if d.numel() > 1 else 0.0,
        }
    return stats


def compare_statistical(
    ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], base: dict[str, torch.Tensor],
    *, unchanged_tol: float = 0.01, std_rel_tol: float = 0.05,
) -> dict:
    """Same distribution of the merged task vector: per tensor, the unchanged fractions within
    ``unchanged_tol`` (absolute) and the delta std within ``std_rel_tol`` (relative); the means
    within 3 standard errors plus a rounding floor. Small tensors (norms) are skipped: too few
    entries for the statistics to settle."""
    so, st = delta_stats(ours, base), delta_stats(theirs, base)
    worst_unchanged = worst_std = worst_mean_z = 0.0
    checked = 0
    for name in so:
        if ours[name].numel() < 10_000:
            continue
        checked += 1
        a, b = so[name], st[name]
        worst_unchanged = max(worst_unchanged, abs(a["unchanged_fraction"] - b["unchanged_fraction"]))
        scale = max(a["std"], b["std"], 1e-12)
        worst_std = max(worst_std, abs(a["std"] - b["std"]) / scale)
        se = scale / math.sqrt(ours[name].numel())
        worst_mean_z = max(worst_mean_z, abs(a["mean"] - b["mean"]) / (se + 1e-3 * scale))
    total_o = sum(ours[k].numel() * so[k]["unchanged_fraction"] for k in so) / sum(ours[k].numel() for k in so)
    total_t = sum(theirs[k].numel() * st[k]["unchanged_fraction"] for k in st) / sum(theirs[k].numel() for k in st)
    return {
        "ok": worst_unchanged <= unchanged_tol and worst_std <= std_rel_tol and worst_mean_z <= 6,
        "tensors_checked": checked,
        "unchanged_fraction_ours": total_o,
        "unchanged_fraction_theirs": total_t,
        "max_abs_diff_unchanged_fraction": worst_unchanged,
        "max_rel_diff_delta_std": worst_std,
        "max_mean_z": worst_mean_z,
        "tolerances": {"unchanged_fraction": unchanged_tol, "delta_std_rel": std_rel_tol, "mean_z": 6},
    }


def compare_outputs(
    kind: str, ours_dir: Path, theirs_dir: Path, base_dir: Path | None = None,
    *, expert_dirs: list[Path] | None = None, ties_density: float | None = None,
) -> dict:
    """Parity report of two output folders; ``kind`` is "exact" or "statistical". For TIES pass
    the input folders and the density so that top-k ties can be told from real mismatches."""
    ours, theirs = load_all(ours_dir), load_all(theirs_dir)
    if kind == "exact":
        ties_inputs = None
        if ties_density is not None and base_dir is not None and expert_dirs:
            ties_inputs = (load_all(base_dir), [load_all(d) for d in expert_dirs], ties_density)
        return {"kind": kind, **compare_exact(ours, theirs, ties_inputs)}
    if kind == "statistical":
        if base_dir is None:
            raise ValueError("statistical parity needs the base checkpoint")
        return {"kind": kind, **compare_statistical(ours, theirs, load_all(base_dir))}
    raise ValueError(kind)


if __name__ == "__main__":  # python -m benchmarks.e2e.parity exact OURS THEIRS [BASE]
    import sys

    print(json.dumps(compare_outputs(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]),
                                     Path(sys.argv[4]) if len(sys.argv) > 4 else None), indent=2))
