"""Hydra configs for FusionBench: ``method/tritonmerge/<name>.yaml`` (docs/fusion_bench.md).
A package so that Hydra's ``pkg://`` search path and setuptools' package_data find them."""
