#!/usr/bin/env bash
# The main job on the embedded default. Until the extraction service lands this
# is the logit-lens explorer over the real SmolLM2-135M model.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh"
cd "$ROOT"
if [[ $# -eq 0 ]]; then
    set -- lens "The capital of France is" "The cat sat on the"
fi
exec slm-lens "$@"
