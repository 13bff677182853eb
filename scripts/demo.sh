#!/usr/bin/env bash
# Set up (if needed) and run the built-in demo end to end.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/ollama-ft demo "$@"
