#!/usr/bin/env python
"""Where a training step's time goes: torch.profiler over one optimizer step of
`ollama-ft train`'s loss (packing, chunked cross-entropy, LoRA on every linear layer) on
the benchmark's model and data (scripts/bench_train.py), after one warm-up step.

    python scripts/profile_train.py --model 0.3b
    python scripts/profile_train.py --model 0.3b --no-gradient-checkpointing --torch-dropout

Prints the operators by self CPU time for the forward and the backward pass, and the
share of the output projection + loss (ChunkedLinearCrossEntropy) in the step.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import bench_train as B  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=B.MODELS, default="0.3b")
    ap.add_argument("--examples", type=int, default=200)
    ap.add_argument("--dropout", type=float, default=B.LORA["dropout"])
    ap.add_argument("--no-gradient-checkpointing", action="store_true")
    ap.add_argument("--torch-dropout", action="store_true", help="PEFT's nn.Dropout, not ours")
    ap.add_argument("--rows", type=int, default=20, help="operators to list per pass")
    args = ap.parse_args()

    from torch.profiler import ProfilerActivity, profile

    from ollama_ft.tinymodel import build_tiny_model
    from ollama_ft.train.allocator import limit_heap_caching
    from ollama_ft.train.dropout import use_fast_lora_dropout
    from ollama_ft.train.loss import selective_lm_loss
    from ollama_ft.train.packing import PackedCollator, pack

    work = Path(tempfile.mkdtemp(prefix="profile-train-"))
    base = build_tiny_model(work / "base", "deepseek-r1-distill-qwen-7b", **B.MODELS[args.model])
    B.make_data(work / "data.jsonl", args.examples)
    _, rows, _ = B.encoded(base, work / "data.jsonl")
    model = B.peft_model(base, args.dropout)
    if not args.torch_dropout:  # as `ollama-ft train` does on the CPU
        use_fast_lora_dropout(model)
    limit_heap_caching()
    if not args.no_gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    packed = pack(rows, B.SEQ)
    batches = [PackedCollator(0)(packed[i:i + B.BATCH]) for i in (0, B.BATCH)]
    for b in batches:
        b.pop("num_real_tokens")
    labels = int((batches[1]["labels"][:, 1:] != -100).sum())
    tokens = int(batches[1]["input_ids"].numel())
    selective_lm_loss(model, batches[0]).backward()  # warm-up
    model.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as fwd:
        loss = selective_lm_loss(model, batches[1])
    t1 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as bwd:
        loss.backward()
    t2 = time.perf_counter()
    print(f"model {args.model}: {tokens} tokens in the step, {labels} of them labels; "
          f"forward {t1 - t0:.2f} s, backward {t2 - t1:.2f} s (under the profiler)")
    for name, prof in (("forward", fwd), ("backward", bwd)):
        print(f"\n{name}:")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    ce = sum(e.cpu_time_total for e in fwd.key_averages() if e.key == "linear_cross_entropy")
    total = sum(e.self_cpu_time_total for p in (fwd, bwd) for e in p.key_averages())
    if ce:
        print(f"output projection + loss: {ce / 1e6:.2f} s of {total / 1e6:.2f} s profiled "
              f"({100 * ce / total:.0f}%)")


if __name__ == "__main__":
    main()
