#!/usr/bin/env bash
# What the Open WebUI browser test (tests/test_openwebui_browser.py) needs: Open WebUI from
# PyPI in its own venv (.venv-openwebui), Debian's Chromium and ChromeDriver, selenium in .venv.
# Re-running is cheap: each part installs only when missing. OPEN_WEBUI_VERSION picks the release.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${OPEN_WEBUI_VERSION:-0.12.4}
PY=${PYTHON:-python3}

quiet() {  # run a pip/apt command; show its output only when it fails
  local log; log=$(mktemp)
  if ! "$@" >"$log" 2>&1; then grep -v "^WARNING: Location" "$log" | tail -40 >&2; rm -f "$log"; return 1; fi
  rm -f "$log"
}

if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  echo "installing Chromium and ChromeDriver (Debian packages chromium, chromium-driver)"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  quiet $SUDO apt-get update -qq
  quiet $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver
fi

if [ ! -f ".venv-openwebui/.open-webui-$VERSION" ]; then
  echo "installing open-webui==$VERSION into .venv-openwebui (first time: about 5 minutes; pip caches it)"
  [ -x .venv-openwebui/bin/python ] || "$PY" -m venv .venv-openwebui
  quiet .venv-openwebui/bin/python -m pip install -q --upgrade pip
  # the CPU torch the tests pin, first: else open-webui's sentence-transformers pulls a CUDA build of several GB
  quiet .venv-openwebui/bin/python -m pip install -q "$(grep -E '^torch==' requirements-test.txt)"
  quiet .venv-openwebui/bin/python -m pip install -q "open-webui==$VERSION"
  touch ".venv-openwebui/.open-webui-$VERSION"
fi

scripts/setup.sh   # .venv, where the test runs
.venv/bin/python -c "import selenium" 2>/dev/null || quiet .venv/bin/python -m pip install -q "selenium>=4.20"
