#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite. Extra arguments go to pytest,
# e.g. scripts/test.sh -m "not slow" for the fast tests only.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# Go's text/template is the reference the template tests compare against (Debian: golang)
if ! command -v go >/dev/null 2>&1; then
  echo "installing Go (Debian package golang) for the template parity tests"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq golang >/dev/null
fi
exec .venv/bin/python -m pytest -rs "$@"
