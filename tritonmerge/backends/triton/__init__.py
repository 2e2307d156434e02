"""The "triton" backend: Triton kernels and their launchers (fused_merge.py, select.py,
stats.py, with every specialisation listed in specializations.py) and their adapters to merge
specs and the analyses' building blocks (merge.py). Nothing here imports triton until a kernel
module is imported."""
