#!/usr/bin/env python
"""Benchmark the export stage against the usual merge-then-convert path.

Builds a ~0.5B-parameter DeepSeek-R1-Distill-Qwen-shaped checkpoint (random weights, bf16,
3 safetensors shards, the real R1 tokenizer) with a rank-16 LoRA adapter on every linear
layer, then measures, each as its own process (wall time and peak RSS from wait4):

  usual path   (a1) PEFT: load base bf16, merge_and_unload, save_pretrained (merged copy)
               (a2) llama.cpp's reference converter: convert_hf_to_gguf.py --outtype f16
               (a3) for Q4_K_M: llama.cpp's quantizer on that F16 file
  ollama-ft    (b1) ollama-ft export RUN --quant f16
               (b2) ollama-ft export RUN --quant q4_k_m (F16 intermediate + llama.cpp)

The reference converter comes from llama-cpp-python's source distribution, fetched at
benchmark time into a temporary folder (pip download --no-deps --no-binary :all:
llama-cpp-python==0.3.36), never into the repository. It needs `sentencepiece`; when the
environment lacks it, it is pip-installed into that temporary folder only.

Usage:  python scripts/bench_export.py [--workdir DIR] [--markdown docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LLAMA_CPP_PYTHON = "0.3.36"
SHAPE = dict(tokenizer="deepseek-r1-distill-qwen-7b", arch="qwen2", hidden=896, layers=16,
             heads=14, kv_heads=2, intermediate=4864, std=0.02, max_positions=131072,
             shard_size="400MB")
LORA = dict(r=16, alpha=32)

BUILD = r"""
import json, sys, torch
from pathlib import Path
from ollama_ft.tinymodel import build_tiny_model
out, run, shape, lora = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3]), json.loads(sys.argv[4])
build_tiny_model(out, **shape)
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
peft = get_peft_model(model, LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], target_modules=targets,
                                        lora_dropout=0.0))
torch.manual_seed(0)
with torch.no_grad():
    for n, p in peft.named_parameters():
        if "lora_B" in n:
            p.normal_(0.0, 0.02)
peft.save_pretrained(run / "adapter")
(run / "run.yaml").write_text(f"name: bench\nbase: {out}\nquant: q4_k_m\n")
(run / "report.json").write_text(json.dumps({"train": {"base": str(out), "base_path": str(out),
    "repo_id": None, "architecture": "qwen2", "chat_format": "deepseek-r1"}}))
"""

USUAL_MERGE = r"""
import shutil, sys, torch
from pathlib import Path
from peft import PeftModel
from transformers import AutoModelForCausalLM
base, adapter, out = map(Path, sys.argv[1:4])
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out, safe_serialization=True)
for name in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copyfile(base / name, out / name)
"""

QUANTIZE = r"""
import ctypes, os, sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.nthread = os.cpu_count()
p.ftype = 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))
"""

OURS = r"""
import sys
from ollama_ft.export import export_stage
export_stage(sys.argv[1], quants=sys.argv[2], log=lambda *a: None)
"""

COMPARE = r"""
import json, os, sys, numpy as np, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
from ollama_ft.llamacpp import open_gguf
text = "<｜begin▁of▁sentence｜>You are a helpful assistant.<｜User｜>What is 2+2? 中文 🚀<｜Assistant｜><think>\n"
out = {}
for name, path in zip(("usual", "ours"), sys.argv[1:3]):
    llm = open_gguf(path, n_ctx=128, logits_all=True, verbose=False, n_threads=os.cpu_count())
    ids = llm.tokenize(text.encode(), add_bos=True, special=True)
    llm.eval(ids)
    out[name] = (ids, np.array(llm.scores[: len(ids)], dtype=np.float64))
    llm.close()
model = AutoModelForCausalLM.from_pretrained(sys.argv[3], dtype=torch.float32)
model = PeftModel.from_pretrained(model, sys.argv[4]).eval()
with torch.no_grad():
    ref = model(torch.tensor([out["ours"][0]])).logits[0].double().numpy()
res = {"same_tokens": out["usual"][0] == out["ours"][0], "n_tokens": len(out["ours"][0])}
for name, (_, logits) in out.items():
    res[name] = {"max_abs_vs_fp32": float(np.abs(logits - ref).max()),
                 "argmax_agree": float((logits.argmax(-1) == ref.argmax(-1)).mean())}
print(json.dumps(res))
"""


def run_measured(label: str, cmd: list[str], env: dict | None = None, warm: list[Path] = ()) -> dict:
    """Run cmd as a child; wall time and the child's peak RSS (wait4). Raises on failure."""
    for path in warm:  # same warm page cache for every contender
        for f in sorted(Path(path).glob("*.safetensors")):
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        log.seek(0)
        tail = log.read()[-3000:]
        raise SystemExit(f"{label} failed (exit {proc.returncode}):\n{tail}")
    os.unlink(log.name)
    rss_mb = usage.ru_maxrss / 1024  # Linux: KiB
    print(f"  {label:<48} {wall:7.1f} s  {rss_mb:8.0f} MiB", flush=True)
    return {"wall_s": wall, "peak_rss_mb": rss_mb}


def fetch_converter(tmp: Path, sdist: Path | None) -> tuple[Path, dict]:
    """llama.cpp's convert_hf_to_gguf.py (+ conversion/, gguf-py/) from the sdist, in tmp."""
    if sdist is None:
        print(f"fetching llama-cpp-python=={LLAMA_CPP_PYTHON} source distribution ...", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        "--no-binary", ":all:", f"llama-cpp-python=={LLAMA_CPP_PYTHON}",
                        "-d", str(tmp)], check=True)
        sdist = next(tmp.glob("llama_cpp_python-*.tar.gz"))
    prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
    wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers()
                   if m.name.startswith(prefix) and m.name[len(prefix):].startswith(wanted)]
        tar.extractall(tmp, members=members, filter="data")
    src = tmp / prefix
    env = dict(os.environ)
    paths = [str(src / "gguf-py")]
    try:
        import sentencepiece  # noqa: F401  (the converter imports it unconditionally)
    except ImportError:
        deps = tmp / "deps"
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--target", str(deps),
                        "sentencepiece"], check=True)
        paths.append(str(deps))
    env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return src / "convert_hf_to_gguf.py", env


def size_mb(path: Path) -> float:
    path = Path(path)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, help="where the checkpoint and outputs go "
                    "(default: a temporary folder, removed at the end)")
    ap.add_argument("--llama-cpp-sdist", type=Path, help="an already downloaded "
                    f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz (skips pip download)")
    ap.add_argument("--markdown", type=Path, help="write the results table to this file")
    ap.add_argument("--keep", action="store_true", help="keep --workdir contents")
    args = ap.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="ollama-ft-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    base, run = work / "base", work / "run"
    py = sys.executable
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    try:
        if not (base / "config.json").is_file() or not (run / "adapter").is_dir():
            shutil.rmtree(base, ignore_errors=True)
            shutil.rmtree(run, ignore_errors=True)
            run.mkdir(parents=True)
            print("building the ~0.5B checkpoint and its adapter (not measured) ...", flush=True)
            subprocess.run([py, "-c", BUILD, str(base), str(run), json.dumps(SHAPE), json.dumps(LORA)],
                           check=True, env=env, stdout=subprocess.DEVNULL)
        shards = sorted(base.glob("*.safetensors"))
        convert, conv_env = fetch_converter(work / "llama.cpp", args.llama_cpp_sdist)
        conv_env.update(TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")

        merged, usual_f16, usual_q4 = work / "merged", work / "usual-f16.gguf", work / "usual-q4_k_m.gguf"
        for p in (merged, usual_f16, usual_q4):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        for p in run.glob("*.gguf"):
            p.unlink()
        print(f"checkpoint: {base} ({len(shards)} shards, {size_mb(base):,.0f} MiB), "
              f"adapter r={LORA['r']} on every linear layer; {os.cpu_count()} CPU cores")
        r = {}
        print("usual path:")
        r["a1"] = run_measured("(a1) PEFT merge_and_unload + save_pretrained",
                               [py, "-c", USUAL_MERGE, str(base), str(run / "adapter"), str(merged)],
                               env, warm=[base])
        r["a2"] = run_measured("(a2) convert_hf_to_gguf.py --outtype f16",
                               [py, str(convert), str(merged), "--outtype", "f16", "--outfile",
                                str(usual_f16)], conv_env)
        r["a3"] = run_measured("(a3) llama.cpp quantize F16 -> Q4_K_M",
                               [py, "-c", QUANTIZE, str(usual_f16), str(usual_q4)], env)
        print("ollama-ft:")
        has_cli = subprocess.run([py, "-m", "ollama_ft", "export", "--help"], env=env,
                                 capture_output=True).returncode == 0

        def ours(quant):  # the CLI when it has the command, else the stage function it calls
            if has_cli:
                return [py, "-m", "ollama_ft", "export", str(run), "--quant", quant]
            return [py, "-c", OURS, str(run), quant]

        r["b1"] = run_measured("(b1) export --quant f16", ours("f16"), env, warm=[base])
        ours_f16 = run / "model-f16.gguf"
        keep = work / "ours-f16.gguf"
        shutil.move(ours_f16, keep)
        r["b2"] = run_measured("(b2) export --quant q4_k_m", ours("q4_k_m"), env, warm=[base])
        check = subprocess.run([py, "-c", COMPARE, str(usual_f16), str(keep), str(base),
                                str(run / "adapter")], env=env, capture_output=True, text=True)
        agreement = json.loads(check.stdout.strip().splitlines()[-1]) if check.returncode == 0 else None

        usual_f16_wall = r["a1"]["wall_s"] + r["a2"]["wall_s"]
        usual_f16_rss = max(r["a1"]["peak_rss_mb"], r["a2"]["peak_rss_mb"])
        usual_q4_wall = usual_f16_wall + r["a3"]["wall_s"]
        usual_q4_rss = max(usual_f16_rss, r["a3"]["peak_rss_mb"])
        rows = [
            ("F16: usual path (a1 + a2)", usual_f16_wall, usual_f16_rss, size_mb(usual_f16)),
            ("F16: `ollama-ft export --quant f16` (b1)", r["b1"]["wall_s"], r["b1"]["peak_rss_mb"],
             size_mb(keep)),
            ("Q4_K_M: usual path (a1 + a2 + a3)", usual_q4_wall, usual_q4_rss, size_mb(usual_q4)),
            ("Q4_K_M: `ollama-ft export --quant q4_k_m` (b2)", r["b2"]["wall_s"],
             r["b2"]["peak_rss_mb"], size_mb(run / "model-q4_k_m.gguf")),
        ]
        ratios = {
            "f16_wall": r["b1"]["wall_s"] / usual_f16_wall,
            "f16_rss": r["b1"]["peak_rss_mb"] / usual_f16_rss,
            "q4_wall": r["b2"]["wall_s"] / usual_q4_wall,
            "q4_rss": r["b2"]["peak_rss_mb"] / usual_q4_rss,
        }
        table = ["| path | wall time (s) | peak RSS (MiB) | output (MiB) |", "|---|---:|---:|---:|"]
        table += [f"| {n} | {w:.1f} | {m:,.0f} | {s:,.0f} |" for n, w, m, s in rows]
        table += ["", f"Per step: (a1) {r['a1']['wall_s']:.1f} s / {r['a1']['peak_rss_mb']:,.0f} MiB, "
                  f"(a2) {r['a2']['wall_s']:.1f} s / {r['a2']['peak_rss_mb']:,.0f} MiB, "
                  f"(a3) {r['a3']['wall_s']:.1f} s / {r['a3']['peak_rss_mb']:,.0f} MiB.",
                  "",
                  f"Ratios, ollama-ft / usual: F16 wall {ratios['f16_wall']:.2f}x (target <= 0.7x), "
                  f"F16 peak RSS {ratios['f16_rss']:.2f}x (target <= 0.6x); Q4_K_M wall "
                  f"{ratios['q4_wall']:.2f}x, peak RSS {ratios['q4_rss']:.2f}x."]
        table += ["", "ollama-ft ran as " + ("`python -m ollama_ft export RUN --quant ...`."
                                              if has_cli else
                                              "a fresh Python process calling `export_stage(RUN, "
                                              "quants=...)`, the function `ollama-ft export` calls.")]
        if agreement:
            u, o = agreement["usual"], agreement["ours"]
            table += ["", f"Fidelity of the two F16 files against the fp32 PyTorch model with the "
                      f"adapter ({agreement['n_tokens']} prompt tokens, identical tokenization: "
                      f"{agreement['same_tokens']}): max |logit diff| usual "
                      f"{u['max_abs_vs_fp32']:.1e} (argmax agrees at {u['argmax_agree']:.0%} of "
                      f"positions), ollama-ft {o['max_abs_vs_fp32']:.1e} "
                      f"({o['argmax_agree']:.0%}). The usual path merges in bf16 and rounds the "
                      "merged weights to bf16 before F16; ollama-ft merges in fp32 and rounds once."]
        else:
            print(check.stderr[-2000:])
        print()
        print("\n".join(table))
        if args.markdown:
            write_markdown(args.markdown, table, len(shards), size_mb(base))
        ok = ratios["f16_wall"] <= 0.7 and ratios["f16_rss"] <= 0.6
        print(f"\ntargets {'met' if ok else 'NOT met'}")
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
        elif not args.keep:
            shutil.rmtree(work / "llama.cpp", ignore_errors=True)


def write_markdown(path: Path, table: list[str], n_shards: int, ckpt_mb: float) -> None:
    import llama_cpp

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        mem = f", {int(open('/proc/meminfo').readline().split()[1]) / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    text = f"""# Benchmarks

## Export: LoRA merge + GGUF conversion

`python scripts/bench_export.py --markdown docs/benchmarks.md` builds a DeepSeek-R1-Distill-Qwen-shaped
checkpoint (Qwen2 architecture, hidden 896, 16 layers, 14 heads / 2 KV heads, FFN 4864, untied
embeddings, the real R1 tokenizer: ~0.5B parameters, random weights, bf16, {n_shards} safetensors
shards, {ckpt_mb:,.0f} MiB) with a rank-16 LoRA adapter on every linear layer, and runs each path
as separate processes, measuring whole-process wall time and peak RSS (`wait4`). The usual path
is PEFT `merge_and_unload` + `save_pretrained`, then llama.cpp's reference converter
(`convert_hf_to_gguf.py` from llama-cpp-python {LLAMA_CPP_PYTHON}'s source distribution) to F16;
its wall time is the sum and its peak RSS the largest of its steps. Page cache warm for both.

Machine: {os.cpu_count()} CPU cores ({cpu}){mem}, {platform.system()} {platform.release()},
Python {platform.python_version()}, llama-cpp-python {llama_cpp.__version__}.

{chr(10).join(table)}

Why it is faster and smaller: one pass, no second copy of the model. ollama-ft memory-maps the
base shards, reads each tensor in blocks of rows, adds `scale * B @ A` in fp32 where the adapter
has a delta, casts and writes straight into the GGUF, and hands the pages back (madvise), so the
resident set stays at a few blocks; it never imports torch. The usual path loads the whole
model, writes a merged copy to disk, and the converter reads that copy again.

Q4_K_M: the F16 step is the same as above; the rest is llama.cpp's own quantizer
(`llama_model_quantize`, all cores), which memory-maps its F16 input, so the peak RSS of both
Q4_K_M rows is about the size of the F16 file (compare step a3 alone). Timings on this shared
2-core machine vary by about 15% from run to run.
"""
    Path(path).write_text(text, encoding="utf-8")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
