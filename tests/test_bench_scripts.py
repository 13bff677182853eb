"""The training benchmark still runs end to end (its figures are in docs/benchmarks.md; no
timing is asserted here)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_train_runs_and_prints_the_table(tmp_path):
    md = tmp_path / "bench.md"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_train.py"), "--model", "tiny",
                        "--steps", "2", "--examples", "40", "--contenders", "common,ollama-ft",
                        "--markdown", str(md)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    table = md.read_text()
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()
            if line.startswith("| common") or line.startswith("| ollama-ft")}
    assert set(rows) == {"common", "ollama-ft"}, table
    assert rows["ollama-ft"].rstrip().endswith("| 1.00x | 1.00x |")
    reported = [json.loads(line.split(": ", 1)[1].rsplit(" (", 1)[0].replace("'", '"'))
                for line in r.stdout.splitlines() if line.startswith(("common: ", "ollama-ft: "))]
    assert len(reported) == 2  # each contender reports what it measured
    for res in reported:
        assert res["tokens"] > 0 and res["peak_rss_mb"] > 0 and res["eval_loss"] > 0
