"""scripts/gpu_check.sh in its CPU dry mode: the same code paths as on the GPU, at tiny size,
so the GPU check cannot rot between the rare runs on a lent GPU. No figure is asserted."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_dry_mode_runs_every_part_and_writes_one_json(tmp_path):
    out = tmp_path / "gpu-check.json"
    env = {**os.environ, "GPU_CHECK_DRY": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHON": sys.executable}  # this interpreter, wherever the checkout's .venv is
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--out", str(out)],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["dry_run"] is True and res["device"] == "cpu"
    for part in ("lora", "lora_nockpt", "usual"):  # trained, with the figures the GPU run reports
        run = res[part]
        assert run["tokens"] > 0 and run["tokens_per_s"] > 0, run
        assert run["final_loss"] > 0
    assert res["lora_over_usual_tokens_per_s"] > 0
    assert res["lora"]["memory_plan"]["predicted_mb"] > 0
    assert res["lora"]["settings"]["packing"] and not res["usual"]["settings"]["packing"]
    # QLoRA trains, or says why it cannot here (bitsandbytes on the CPU is another item)
    assert res["qlora"].get("tokens", 0) > 0 or "skipped" in res["qlora"], res["qlora"]
    sdpa = res["packing"]["sdpa"]
    # packed examples do not see each other, and the control (no position restart) does
    assert sdpa["isolated"], sdpa
    assert sdpa["control_unrestarted_max_abs"] > 10 * sdpa["packed_vs_alone_max_abs"], sdpa
    assert sdpa["kernels"], "the profiler saw no attention op"
    assert sdpa["attn_implementation"] == "sdpa"
