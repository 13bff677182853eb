#!/usr/bin/env python
"""The GPU check behind scripts/gpu_check.sh: one run, one JSON file of figures.

On one CUDA GPU, with the DeepSeek-R1-Distill-Qwen-1.5B configuration (random weights, the
real tokenizer; scripts/bench_scale.py builds it tensor by tensor):

  lora      ollama-ft's train stage: bf16 LoRA (r=16, every linear layer) with packing,
            its defaults otherwise (gradient checkpointing on); lora_nockpt: the same with
            gradient checkpointing off, as the usual recipe runs
  usual     the usual recipe on the same data and budget: transformers Trainer + PEFT,
            every example padded to max_len, loss over the full logits
            (scripts/bench_train.py's "common" contender)
  qlora     ollama-ft's train stage with --load-in-4bit (NF4 base, bf16 compute)
  packing   which attention kernel runs on packed rows (torch profiler op names, the
            attention implementation transformers picked, the SDPA backends enabled), and
            that examples in one row do not attend to each other: an example's logits alone
            equal its logits packed after another one (position_ids restart), and differ
            without the restart (the control)
  plan      ollama_ft.memplan's prediction for the lora and qlora runs beside the measured peak

Each training run reports tokens/s (trained, non-padding tokens; the steady rate after the
first steps, and over the whole run), peak GPU memory (torch.cuda.max_memory_allocated) and
MFU: 4 * N FLOPs per trained token for LoRA (forward 2N, activation gradients 2N; N = the
parameters that do matmuls: every weight but the input embedding) over the GPU's dense bf16
peak. usual/lora is the speed ratio.

Dry mode (--dry-run or GPU_CHECK_DRY=1): the same code paths on the CPU at tiny size, in well
under a minute, so CI keeps this script from rotting. Figures there mean nothing.

    scripts/gpu_check.sh                      # on the GPU machine: writes gpu-check.json
    GPU_CHECK_DRY=1 scripts/gpu_check.sh --out /tmp/gpu-check.json
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
sys.path.insert(0, str(ROOT))

# full run: sized for < 8 minutes on one H100/H200-class GPU, checkpoint build included
FULL = dict(size="1.5b", batch=8, max_len=1024, steps=30, warm_steps=5, examples=4000)
DRY = dict(size="tiny", batch=2, max_len=128, steps=2, warm_steps=1, examples=48)
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200": 989.0,
                    "B200": 2250.0, "A100": 312.0, "L40S": 362.0, "L40": 181.0, "L4": 121.0,
                    "4090": 165.0, "A10": 125.0}


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def matmul_parameters(base: Path) -> int:
    """Parameters that do matmuls per token: all but the input embedding."""
    from ollama_ft.export.merge import Checkpoint

    ck = Checkpoint(base)
    try:
        emb = next((ck.info(n) for n in ck.names() if n.endswith("embed_tokens.weight")), None)
        return ck.parameter_count() - (emb.shape[0] * emb.shape[1] if emb else 0)
    finally:
        ck.close()


def peak_tflops(device: str) -> tuple[str, float | None]:
    if device != "cuda":
        return platform.processor() or platform.machine(), None
    import torch

    name = torch.cuda.get_device_name()
    return name, next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def reset_device(device: str) -> None:
    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_device_mb(device: str) -> float | None:
    if device != "cuda":
        return None
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**20, 1)


def steady_rate(metrics: Path, warm_steps: int) -> float | None:
    """Tokens/s between the end of step `warm_steps` and the last step (metrics.jsonl)."""
    rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    rows = [r for r in rows if "loss" in r and "tokens_seen" in r]
    first = next((r for r in rows if r["step"] >= warm_steps), None)
    last = rows[-1] if rows else None
    if first is None or last is None or last["elapsed_s"] <= first["elapsed_s"]:
        return None
    return (last["tokens_seen"] - first["tokens_seen"]) / (last["elapsed_s"] - first["elapsed_s"])


def run_ours(base, data, out, p, device, load_in_4bit=False, checkpointing=True) -> dict:
    """ollama-ft's train stage in this process (bf16 on the GPU, fp32 on the CPU)."""
    from ollama_ft.config import RunConfig
    from ollama_ft.train.trainer import train_stage

    cfg = RunConfig(name="gpu-check", base=str(base), data=str(data), output_dir=str(out),
                    max_steps=p["steps"], batch_size=p["batch"], max_len=p["max_len"],
                    lr=2e-4, warmup=0, scheduler="linear", logging_steps=1, save_steps=10**6,
                    seed=0, export=False, register=False, report_to="none", device=device,
                    precision="bf16" if device == "cuda" else "fp32",
                    gradient_checkpointing=checkpointing, load_in_4bit=load_in_4bit).validate()
    reset_device(device)
    t0 = time.perf_counter()
    train_stage(cfg, log=lambda *a: None)
    wall = time.perf_counter() - t0
    report = json.loads((out / "report.json").read_text())["train"]
    return {"tokens": report["tokens_seen"], "tokens_per_s": report["tokens_per_s"],
            "steady_tokens_per_s": steady_rate(out / "metrics.jsonl", p["warm_steps"]),
            "peak_gpu_mb": peak_device_mb(device), "final_loss": report.get("final_loss"),
            "steps": report["steps"], "wall_s": round(wall, 1), "precision": report["precision"],
            "settings": {"batch": p["batch"], "max_len": p["max_len"], "packing": True,
                         "gradient_checkpointing": cfg.gradient_checkpointing,
                         "load_in_4bit": load_in_4bit}}


def run_usual(base, data, out, p, device) -> dict:
    """scripts/bench_train.py's "common" contender: Trainer + PEFT, padded rows."""
    bt = _load("bench_train")
    bt.SEQ, bt.DEVICE, bt.BATCH = p["max_len"], device, p["batch"]
    reset_device(device)
    t0 = time.perf_counter()
    res, model, _ = bt.run_common(base, data, p["steps"], out)
    wall = time.perf_counter() - t0
    del model
    return {"tokens": res["tokens"], "tokens_per_s": res["tokens"] / res["train_s"],
            "peak_gpu_mb": peak_device_mb(device), "final_loss": res["final_loss"],
            "wall_s": round(wall, 1),
            "settings": {"batch": p["batch"], "max_len": p["max_len"], "packing": False,
                         "gradient_checkpointing": False, "load_in_4bit": False}}


def packing_check(base: Path, data: Path, device: str) -> dict:
    """Which attention kernel runs on a packed row, and whether the examples in it stay apart."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ollama_ft.chat_formats import FORMATS
    from ollama_ft.data.check import check_data

    tok = AutoTokenizer.from_pretrained(base)
    _, enc, _ = check_data(data, tok, FORMATS["deepseek-r1"], 512)
    e1, e2 = ([int(t) for t in enc[i].input_ids] for i in (0, 1))
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    out: dict = {"sdpa_backends_enabled": {}}
    if device == "cuda":
        out["sdpa_backends_enabled"] = {
            "flash": torch.backends.cuda.flash_sdp_enabled(),
            "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
            "cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
            "math": torch.backends.cuda.math_sdp_enabled()}
    impls = ["sdpa"]
    if importlib.util.find_spec("flash_attn") is not None and device == "cuda":
        impls.append("flash_attention_2")
    else:
        out["flash_attention_2"] = {"skipped": "the flash-attn package is not installed" if
                                    device == "cuda" else "CUDA only"}
    for impl in impls:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype,
                                                     attn_implementation=impl).to(device).eval()
        ids = torch.tensor([e1 + e2], device=device)
        restart = torch.tensor([list(range(len(e1))) + list(range(len(e2)))], device=device)
        with torch.no_grad():
            # use_cache=False, as in training: with a KV cache transformers does not look
            # for packed sequences in position_ids
            alone = model(input_ids=torch.tensor([e2], device=device), use_cache=False,
                          position_ids=torch.arange(len(e2), device=device)[None]).logits[0].float()
            acts = [torch.profiler.ProfilerActivity.CPU] + (
                [torch.profiler.ProfilerActivity.CUDA] if device == "cuda" else [])
            with torch.profiler.profile(activities=acts) as prof:
                packed = model(input_ids=ids, position_ids=restart,
                               use_cache=False).logits[0, len(e1):].float()
            control = model(input_ids=ids, use_cache=False).logits[0, len(e1):].float()  # attends
        ops = sorted({e.key for e in prof.key_averages()
                      if any(s in e.key.lower() for s in ("attention", "flash", "fmha", "sdpa",
                                                          "softmax", "attn"))})
        diff = float((packed - alone).abs().max())
        control_diff = float((control - alone).abs().max())
        agree = float((packed.argmax(-1) == alone.argmax(-1)).float().mean())
        if device == "cuda":  # bf16, and other kernels with a mask than without: rounding
            isolated = diff < 0.1 * control_diff and agree >= 0.9
        else:
            isolated = diff <= 1e-3 < control_diff
        out[impl] = {"attn_implementation": model.config._attn_implementation,
                     "kernels": ops, "packed_vs_alone_max_abs": diff,
                     "control_unrestarted_max_abs": control_diff, "argmax_agree": agree,
                     "isolated": isolated, "tokens": [len(e1), len(e2)]}
        del model
        reset_device(device)
    return out


def memory_plan(base: Path, run: dict, device: str) -> dict:
    from ollama_ft.memplan import Settings, plan, shape_from_config

    config = json.loads((base / "config.json").read_text())
    s = run["settings"]
    p = plan(shape_from_config(config, base), Settings(
        device, "bf16" if device == "cuda" else "fp32", s["batch"], s["max_len"],
        s["gradient_checkpointing"], s["load_in_4bit"], 16))
    measured = run.get("peak_gpu_mb")
    return {"predicted_mb": round(p.peak / 2**20, 1), "measured_mb": measured,
            "error": round(p.peak / 2**20 / measured - 1, 3) if measured else None}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", default=os.environ.get("GPU_CHECK_DRY") == "1",
                    help="tiny model on the CPU (also GPU_CHECK_DRY=1)")
    ap.add_argument("--out", type=Path, default=Path("gpu-check.json"), help="the JSON file")
    ap.add_argument("--work", type=Path, help="checkpoint and runs (default: a folder next to --out)")
    ap.add_argument("--only", help="comma-separated parts: lora, lora_nockpt, usual, qlora, packing")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    p = DRY if args.dry_run else FULL
    import torch

    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    if device == "cpu" and not args.dry_run:
        raise SystemExit("no CUDA GPU: run on the GPU machine, or use the dry mode "
                         "(--dry-run / GPU_CHECK_DRY=1)")
    work = args.work or args.out.resolve().parent / "gpu-check-work"
    work.mkdir(parents=True, exist_ok=True)
    parts = (args.only or "lora,lora_nockpt,usual,qlora,packing").split(",")
    gpu, peak = peak_tflops(device)
    res: dict = {"dry_run": args.dry_run, "device": device, "gpu": gpu, "peak_bf16_tflops": peak,
                 "torch": torch.__version__, "cuda": torch.version.cuda, "parameters": p,
                 "started": time.strftime("%Y-%m-%d %H:%M:%S")}

    def save():
        res["wall_s"] = round(time.perf_counter() - t_start, 1)
        args.out.write_text(json.dumps(res, indent=2))

    scale = _load("bench_scale")
    base = work / f"base-{p['size']}"
    if not (base / "config.json").is_file():
        t0 = time.perf_counter()
        shutil.rmtree(base, ignore_errors=True)
        scale.build_checkpoint(base, p["size"])
        res["build_s"] = round(time.perf_counter() - t0, 1)
    data = work / "data.jsonl"
    scale.make_data(data, p["examples"])
    n = matmul_parameters(base)
    res["matmul_parameters"] = n

    def mfu(tps):
        return round(tps * 4 * n / (peak * 1e12), 4) if (peak and tps) else None

    runs = {"lora": lambda o: run_ours(base, data, o, p, device),
            "lora_nockpt": lambda o: run_ours(base, data, o, p, device, checkpointing=False),
            "usual": lambda o: run_usual(base, data, o, p, device),
            "qlora": lambda o: run_ours(base, data, o, p, device, load_in_4bit=True)}
    for name in [x for x in runs if x in parts]:
        out = work / name
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        try:
            r = runs[name](out)
        except Exception as e:  # a part that cannot run says why; the others still run
            import traceback

            from ollama_ft.errors import OllamaFtError

            if not isinstance(e, OllamaFtError) and device == "cpu":
                raise  # the dry mode is CI: a bug must fail it
            res[name] = {"skipped": f"{type(e).__name__}: {e}",
                         "traceback": traceback.format_exc()[-3000:]}
            print(f"{name}: skipped ({type(e).__name__}: {e})", flush=True)
            save()
            continue
        r["mfu"] = mfu(r.get("steady_tokens_per_s") or r["tokens_per_s"])
        if name != "usual":
            r["memory_plan"] = memory_plan(base, r, device)
        res[name] = r
        print(f"{name}: {json.dumps(r)}", flush=True)
        save()
    for name in ("lora", "lora_nockpt"):  # the speed-up over the usual recipe
        if "tokens_per_s" in res.get(name, {}) and "tokens_per_s" in res.get("usual", {}):
            res[f"{name}_over_usual_tokens_per_s"] = round(
                res[name]["tokens_per_s"] / res["usual"]["tokens_per_s"], 3)
    if "packing" in parts:
        try:
            res["packing"] = packing_check(base, data, device)
        except Exception as e:
            if device == "cpu":
                raise
            import traceback

            res["packing"] = {"skipped": f"{type(e).__name__}: {e}",
                              "traceback": traceback.format_exc()[-3000:]}
        print(f"packing: {json.dumps(res['packing'])}", flush=True)
    save()
    print(f"wrote {args.out} in {res['wall_s']} s", flush=True)
    return res


if __name__ == "__main__":
    main()
