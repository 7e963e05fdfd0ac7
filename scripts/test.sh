#!/usr/bin/env bash
# The whole test suite, style checks included. CI (.ci/run) runs exactly this.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh"
cd "$ROOT"
ruff check .
ruff format --check .
exec python -m pytest "$@"
