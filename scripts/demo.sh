#!/usr/bin/env bash
# The main job on the embedded default: local Ray, a local store, DuckDB.
# Trains the organism on first use (630 steps, ~7 minutes on 2 cores; cached), speaks held-out sentences with
# espeak-ng, extracts every layer's lens into stores/demo and prints a per-layer summary.
# Any other slm-lens command works too: ./scripts/demo.sh lens "The capital of France is"
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh"
cd "$ROOT"
if [[ $# -eq 0 ]]; then
    set -- demo --store stores/demo
fi
exec slm-lens "$@"
