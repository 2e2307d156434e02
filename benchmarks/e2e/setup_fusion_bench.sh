#!/usr/bin/env bash
# FusionBench in its own virtualenv, on the same CPU torch as tritonmerge, for the FusionBench
# integration tests (tests/test_fusion_bench_integration.py) and docs/fusion_bench.md. Never
# needed by the package itself.
#
#   bash benchmarks/e2e/setup_fusion_bench.sh [VENV_DIR]     (default /work/venv-fusionbench)
#   TRITONMERGE_FUSION_BENCH_PYTHON=VENV_DIR/bin/python python -m pytest tests/test_fusion_bench_integration.py
#
# Exits non-zero when the virtualenv cannot be built (a pip failure, or fusion-bench needing
# another torch than the pinned one).
set -euo pipefail

VENV="${1:-/work/venv-fusionbench}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
FUSION_BENCH_VERSION="${FUSION_BENCH_VERSION:-0.2.33}"
# fusion-bench does not bound transformers: 5.25.0 (with kernels 0.19) fails in from_pretrained
# with "Unsupported device type 'meta'" when FusionBench loads a pool; 5.23.0 is the tested one
TRANSFORMERS_VERSION="${TRANSFORMERS_VERSION:-5.23.0}"

python3 -m venv "$VENV"
# torch first, pinned: an unpinned resolve would pull a multi-GB CUDA build
"$VENV/bin/pip" install "torch==${TORCH_VERSION}"
# torch named again in the same resolve: pip then cannot replace it, and stops with an error
# (non-zero exit) if fusion-bench's requirements need another torch
"$VENV/bin/pip" install "fusion-bench==${FUSION_BENCH_VERSION}" "torch==${TORCH_VERSION}" "transformers==${TRANSFORMERS_VERSION}"
"$VENV/bin/python" -c "import torch, fusion_bench, hydra, importlib.metadata as m; print('fusion-bench', m.version('fusion-bench'), 'torch', torch.__version__, 'hydra', hydra.__version__)"
