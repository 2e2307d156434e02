"""Bridges that let other tools run tritonmerge's methods. Each submodule imports its host tool
lazily, so tritonmerge itself never depends on it."""
