#!/usr/bin/env bash
# The main job on the embedded default: local Ray, a local store, DuckDB.
# Builds a demo dataset (espeak-ng + LibriVox), a SIMS-layout model from the real
# SmolLM2-135M, extracts every layer's lens into stores/demo and prints a summary.
# Any other slm-lens command works too: ./scripts/demo.sh lens "The capital of France is"
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh"
cd "$ROOT"
if [[ $# -eq 0 ]]; then
    set -- demo --store stores/demo
fi
exec slm-lens "$@"
