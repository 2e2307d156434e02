"""The "cpu" backend: fused C/OpenMP loops (merge_cpu.c, compiled on first use by kernels.py)
and their adapters to merge specs and the analyses' building blocks (merge.py)."""
