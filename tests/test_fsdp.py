"""FSDP and ZeRO-3: what runs where.

On a CPU-only machine accelerate (1.x) does not shard: with an FSDP or DeepSpeed config it
trains with DDP, a whole model per process (its state.py turns FSDP on only for GPU-class
devices), and torch's FSDP1 refuses the CPU outright. So `ollama-ft train` refuses a sharded
launch of a CPU run, and that refusal is tested here. torch's FSDP2 (fully_shard) does run on
the CPU with gloo: the loss path (train/loss.py) and the adapter gather
(train/distributed.py) are tested under it, sharded the way accelerate's FSDP2 shards a
PEFT model (each decoder layer, the embeddings, lm_head, the root).

This file is also the FSDP2 worker: `python -m torch.distributed.run --nproc_per_node 2
tests/test_fsdp.py BASE OUT` (one process without the launcher: the unsharded reference).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAIRS = [("Where is Sweden?", "Bern is."), ("Where is Paris?", "Sweden is.")]
STEPS = 3


def _env(**extra):
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(ROOT), **extra}


def _train_cmd(base, data, out):
    return ["-m", "ollama_ft", "train", "--base", str(base), "--data", str(data), "--name", "f",
            "--output-dir", str(out), "--max-steps", "2", "--no-export"]


# --- refusals: FSDP / ZeRO-3 asked of a CPU run -------------------------------------------------

@pytest.mark.parametrize("env,asked", [
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, "FSDP"),
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, "DeepSpeed"),
])
def test_sharded_launch_of_a_cpu_run_is_refused_before_anything_loads(tmp_path, env, asked):
    """What `accelerate launch --config_file fsdp.yaml` (or a DeepSpeed config) hands each
    process: refused with what / why / what to do, exit 2, no traceback, nothing written."""
    from tests.conftest import qa_rows, write_jsonl

    data = write_jsonl(tmp_path / "d.jsonl", qa_rows(PAIRS))
    r = subprocess.run([sys.executable, *_train_cmd(tmp_path / "no-such-base", data,
                                                    tmp_path / "run")],
                       capture_output=True, text=True, env=_env(**env), timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"error: {asked} was asked for" in r.stderr
    assert "trains on the CPU" in r.stderr and "torchrun --nproc_per_node N" in r.stderr
    assert f"{asked} needs CUDA GPUs" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()  # refused before the base or the data were read


def test_deepspeed_launch_without_deepspeed_installed_is_refused(monkeypatch):
    """On a GPU machine without deepspeed (accelerate's own launcher stops a DeepSpeed config
    first; torchrun with its environment reaches here)."""
    import builtins

    from ollama_ft.errors import ConfigError
    from ollama_ft.train.distributed import check_sharding

    real_import = builtins.__import__

    def no_deepspeed(name, *a, **kw):
        if name == "deepspeed":
            raise ImportError("No module named 'deepspeed'")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_deepspeed)
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    check_sharding("cuda")  # nothing asked: nothing to refuse
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ConfigError, match="not installed: pip install deepspeed"):
        check_sharding("cuda")
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    check_sharding("cuda")  # FSDP on a GPU: accelerate's to run


@pytest.mark.slow
def test_accelerate_launch_with_an_fsdp_config_on_cpu_is_refused(tiny_base, tmp_path):
    """The README's command, for real: `accelerate launch --config_file fsdp.yaml` on this
    CPU-only machine (2 processes). Both ranks refuse; without the refusal accelerate would
    train with DDP and call it done."""
    from tests.conftest import free_port, qa_rows, write_jsonl

    data = write_jsonl(tmp_path / "d.jsonl", qa_rows(PAIRS))
    cfg = tmp_path / "fsdp.yaml"
    cfg.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: FSDP\nnum_machines: 1\n"
        f"num_processes: 2\nmachine_rank: 0\nmain_process_port: {free_port()}\n"
        "mixed_precision: 'no'\nuse_cpu: false\nfsdp_config:\n  fsdp_version: 2\n"
        "  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP\n  fsdp_state_dict_type: FULL_STATE_DICT\n"
        "  fsdp_cpu_ram_efficient_loading: false\n  fsdp_offload_params: false\n")
    r = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(cfg),
         *_train_cmd(tiny_base("r1-qwen"), data, tmp_path / "run")],
        capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode != 0
    assert r.stderr.count("error: FSDP was asked for") == 2, r.stderr[-3000:]
    assert not (tmp_path / "run").exists()


# --- FSDP2 on 2 CPU ranks: the loss path and the adapter gather under real sharding -------------

def _worker(base: str, out: str) -> None:
    import torch
    import torch.distributed as dist
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    from ollama_ft.chat_formats import FORMATS, Message
    from ollama_ft.config import RunConfig
    from ollama_ft.data.tokenize import encode
    from ollama_ft.train import loss as L
    from ollama_ft.train.distributed import adapter_state_dict
    from ollama_ft.train.lora import lora_config
    from ollama_ft.train.trainer import Collator, _save_adapter

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    tok = AutoTokenizer.from_pretrained(base)
    rows = []
    for q, a in PAIRS:
        e = encode(tok, FORMATS["deepseek-r1"], [Message("user", q), Message("assistant", a)], None)
        rows.append({"input_ids": e.input_ids, "labels": e.labels})
    batch = Collator(tok.pad_token_id)([rows[rank]] if world > 1 else rows)

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    set_seed(0)
    model = get_peft_model(model, lora_config(RunConfig(lora_dropout=0.0), "qwen2"))
    if world > 1:  # as accelerate 1.15's FSDP2 (TRANSFORMER_BASED_WRAP) shards a PeftModel:
        from torch.distributed.fsdp import fully_shard

        lm = model.get_base_model()
        for layer in lm.model.layers:
            fully_shard(layer)
        fully_shard(lm.model.embed_tokens)
        # its tail unit is [final norm, lm_head], but it finds no final norm among a
        # PeftModel's children: lm_head is a unit alone, a shard until its own hook runs
        fully_shard([lm.lm_head], reshard_after_forward=False)
        fully_shard(model)

    seen = []  # the output projection's weight as the chunked loss saw it
    real = L.ChunkedLinearCrossEntropy

    class Spy:
        @staticmethod
        def apply(h, weight, *rest):
            local = getattr(weight, "_local_tensor", weight)
            seen.append([type(weight).__name__, list(weight.shape), list(local.shape)])
            return real.apply(h, weight, *rest)

    L.ChunkedLinearCrossEntropy = Spy
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2,
                            weight_decay=0.0)
    losses = []
    for _ in range(STEPS):
        loss = L.selective_lm_loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        mean = loss.detach().clone()
        if world > 1:
            dist.all_reduce(mean)
            mean /= world
        losses.append(float(mean))

    weights = adapter_state_dict(model)  # every rank: the gather is collective
    if rank == 0:
        _save_adapter(model, Path(out), weights)
        (Path(out) / "probe.json").write_text(json.dumps({
            "losses": losses, "seen": seen,
            "vocab": model.get_base_model().lm_head.out_features}))
    if world > 1:
        dist.destroy_process_group()


def _run_worker(base, out, nproc, port=0):
    cmd = [str(Path(__file__).resolve()), str(base), str(out)]
    if nproc > 1:
        cmd = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(port)] + cmd
    r = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, env=_env(),
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    from safetensors.torch import load_file

    return (load_file(Path(out) / "adapter" / "adapter_model.safetensors"),
            json.loads((Path(out) / "probe.json").read_text()))


@pytest.mark.slow
def test_fsdp2_two_cpu_ranks_train_the_adapter_of_one_process(tiny_base, tmp_path):
    """FSDP2 on 2 gloo ranks x 1 example equals 1 process x both examples (same token
    counts, no dropout): the loss sees lm_head's weight whole (its shard unit gathered by
    calling the module, not read from outside), gradients are reduced across ranks, and
    the saved adapter is gathered whole from the shards."""
    from tests.conftest import free_port

    base = tiny_base("r1-qwen")
    one, p1 = _run_worker(base, tmp_path / "one", 1)
    two, p2 = _run_worker(base, tmp_path / "two", 2, free_port())
    vocab = p2["vocab"]
    # the chunked loss ran (not the plain-logits fallback) on the gathered weight, every step
    assert len(p2["seen"]) == STEPS
    assert all(t != "DTensor" and s == l == [vocab, s[1]] for t, s, l in p2["seen"]), p2["seen"]
    assert p2["losses"] == pytest.approx(p1["losses"], abs=1e-5)
    assert one.keys() == two.keys() and len(one) == 28
    assert all(one[k].shape == two[k].shape for k in one)  # whole tensors, not shards
    moved = max(float(t.abs().max()) for k, t in one.items() if "lora_B" in k)
    assert moved > 1e-3  # training changed the adapter
    diff = max(float((one[k] - two[k]).abs().max()) for k in one)
    assert diff < 1e-5, diff


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    _worker(sys.argv[1], sys.argv[2])
