"""scripts/bench_scale.py at tiny size: the checkpoint it writes tensor by tensor is the model
transformers builds, and every step still runs end to end (its figures at 1.5B and 7B are in
docs/benchmarks.md; no figure is asserted here)."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _bench():
    spec = importlib.util.spec_from_file_location("bench_scale", ROOT / "scripts" / "bench_scale.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_streamed_checkpoint_is_the_real_config_and_loads(tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM

    bench = _bench()
    monkeypatch.setattr(bench, "SHARD_BYTES", 30 << 20)  # several shards and an index
    info = bench.build_checkpoint(tmp_path / "base", "tiny")
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    for key, value in bench.SIZES["tiny"].items():
        assert config[key] == value
    assert config["architectures"] == ["Qwen2ForCausalLM"] and not config["tie_word_embeddings"]
    assert len(info["files"]) > 1 and (tmp_path / "base" / "model.safetensors.index.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    assert sum(p.numel() for p in model.parameters()) == info["parameters"]
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.all(p == 1), name
        elif p.numel() >= 4096:  # N(0, 0.02), not zeros or a copy of one block
            assert abs(p.float().std().item() - bench.STD) < 0.2 * bench.STD, name
    emb = model.model.embed_tokens.weight
    assert not torch.equal(emb[:100], emb[100:200])
    assert math.isclose(info["bytes"], 2 * info["parameters"], rel_tol=0.01)


@pytest.mark.slow
def test_bench_scale_runs_every_step_at_tiny_size(tmp_path):
    out = tmp_path / "tiny.json"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_scale.py"), "--size", "tiny",
                        "--work", str(tmp_path), "--train", "2x64", "--max-steps", "1",
                        "--steps", "train,export,register", "--json", str(out)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    train = res["train"][0]
    assert train["steps"] == 1 and train["tokens_seen"] > 0 and train["peak_rss_mb"] > 0
    assert "ollama_ft train" in train["command"] and "--no-export" in train["command"]
    assert res["export"]["size_mb"] > 0 and "--quant q4_k_m" in res["export"]["command"]
    assert res["register"]["eval_count"] > 0  # the bridge answered with the registered model
    assert {c["label"] for c in res["commands"]} >= {"train 2x64", "export q4_k_m", "register"}
