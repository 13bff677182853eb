#!/usr/bin/env bash
# One command on one GPU, under 8 minutes: bf16 LoRA with packing on the
# R1-Distill-Qwen-1.5B-shaped model (tokens/s, peak VRAM, MFU), the usual Trainer + PEFT
# recipe in the same run (the ratio), QLoRA, and which attention kernel runs on packed rows
# (and that packed examples do not attend to each other). Figures go to one JSON file.
#
#   scripts/gpu_check.sh [--out gpu-check.json] [--work DIR] [--only lora,lora_nockpt,usual,qlora,packing]
#   GPU_CHECK_DRY=1 scripts/gpu_check.sh      # (or --dry-run) the same code on the CPU, tiny
#
# See scripts/gpu_check.py for what each figure means.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
py="${PYTHON:-}"
if [[ -z "$py" ]]; then
  if [[ -x "$root/.venv/bin/python" ]]; then py="$root/.venv/bin/python"; else py="python3"; fi
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
# a guard: the check is sized for ~5 minutes on an H100/H200; past 8 it is stopped
exec timeout --signal=INT 480 "$py" "$here/gpu_check.py" "$@"
