#!/usr/bin/env bash
# Optional benchmark dependency: mergekit in its own virtualenv, on the same CPU torch as
# tritonmerge, so that the side-by-side compares the tools and not two torch builds.
# Never needed by the package or CI.
#
#   bash benchmarks/e2e/setup_mergekit.sh [VENV_DIR]     (default /work/venv-mergekit)
#   python -m benchmarks.e2e.run --mergekit-python VENV_DIR/bin/python ...
set -euo pipefail

VENV="${1:-/work/venv-mergekit}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
MERGEKIT_VERSION="${MERGEKIT_VERSION:-0.1.5}"
# mergekit does not bound transformers either: pin the version its parity tests last passed with
TRANSFORMERS_VERSION="${TRANSFORMERS_VERSION:-5.25.0}"

python3 -m venv "$VENV"
# torch first, pinned: an unpinned resolve would pull a multi-GB CUDA build
"$VENV/bin/pip" install "torch==${TORCH_VERSION}"
# refuse to continue if mergekit's pins would replace that torch
if "$VENV/bin/pip" install --dry-run "mergekit==${MERGEKIT_VERSION}" 2>/dev/null | grep -E "^Would install" | grep -q " torch-"; then
    echo "mergekit ${MERGEKIT_VERSION} would replace torch ${TORCH_VERSION}; pick another MERGEKIT_VERSION" >&2
    exit 1
fi
"$VENV/bin/pip" install "mergekit==${MERGEKIT_VERSION}" "transformers==${TRANSFORMERS_VERSION}"
"$VENV/bin/python" -c "import torch, importlib.metadata as m; print('mergekit', m.version('mergekit'), 'torch', torch.__version__)"
