#!/usr/bin/env bash
# Build .whl/ (git-ignored, repo root): the wheels the GPU image lacks, for its Python 3.12 on
# x86-64, so that run.sh can install them there without a network. Run it here, then name `.whl`
# in the device tool's carry. run.sh installs them only when an import it needs is missing.
#
#   bash benchmarks/gpu/make_wheels.sh                 # pydantic and its dependencies
#   bash benchmarks/gpu/make_wheels.sh --mergekit      # + mergekit and what the image lacks for it
#   bash benchmarks/gpu/make_wheels.sh NAME[==VER]...  # + any other package run.sh names as missing
#
# Versions follow this machine's environment where a package is installed here (the project is
# tested with them), else the newest. The folder is made anew: two versions of one package would
# stop the whole install there.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
PY_VERSION=${PY_VERSION:-3.12}

# What tritonmerge needs and the GPU image does not hold (its package list: pydantic is not in it);
# typing-extensions rides along because pydantic needs a recent one.
names=(pydantic pydantic-core annotated-types typing-inspection typing-extensions)
for arg in "$@"; do
  case "$arg" in
    --mergekit) names+=(mergekit immutables) ;;  # the image has transformers, accelerate, peft, click
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) names+=("$arg") ;;
  esac
done

pinned=()
for name in "${names[@]}"; do
  if [[ "$name" == *"=="* ]]; then pinned+=("$name"); continue; fi
  version=$("$PYTHON" -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass" "$name")
  pinned+=("${name}${version:+==$version}")
done

rm -rf .whl
mkdir -p .whl
echo "make_wheels: downloading for CPython $PY_VERSION x86-64: ${pinned[*]}"
# pip matches manylinux_2_N exactly: name the common N so binary wheels of any of them are found
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  --platform any -d .whl "${pinned[@]}"
ls -la .whl
size=$(du -sm .whl | cut -f1)
echo "make_wheels: .whl holds ${size} MiB (the device tool carries at most 64 MiB with the working tree)"
if (( size > 32 )); then echo "make_wheels: WARNING: over 32 MiB; leave out what the image already has" >&2; fi
echo "make_wheels: on the device: run with carry [\".whl\"]: bash benchmarks/gpu/run.sh"
