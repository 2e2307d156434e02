#!/usr/bin/env bash
# The day a GPU is lent: extension build, gpu-marked tests, kernel, WUDI and end-to-end benchmarks
# on one H100/H200 within 8 minutes, results as JSON named by device, a one-screen summary.
#   bash benchmarks/gpu/run.sh            # on the GPU machine
#   bash benchmarks/gpu/run.sh --smoke    # the same steps at tiny sizes on CPU (CI runs this)
# Options: python -m benchmarks.gpu.driver --help. Details: benchmarks/gpu/README.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
# the GPU image's torch lives in its python3; CI and the dev machine activate .venv first
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
exec "$PYTHON" -m benchmarks.gpu.driver "$@"
