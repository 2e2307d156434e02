"""The one-command GPU run (``bash benchmarks/gpu/run.sh``); see README.md beside this file."""
