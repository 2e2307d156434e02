"""End-to-end disk-to-disk merge benchmarks: tritonmerge against the I/O floor and against mergekit.

Entry point: ``python -m benchmarks.e2e.run --shape 150m`` (see README.md in this folder).
"""
