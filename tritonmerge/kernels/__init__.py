"""Triton kernels and their launchers only: no policy, no registry. Imported lazily."""
