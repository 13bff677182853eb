"""Which precision the frozen base runs in on the CPU.

CPUs with bfloat16 instructions (x86: AVX512-BF16 or AMX-BF16; Arm: the BF16 extension) do
a bf16 matmul at about twice the fp32 rate, with half the memory for the weights. There
`--precision auto` loads the frozen base in bf16 and runs the step under bf16 autocast, as
on a GPU; the LoRA weights (the master copy autocast casts from), their gradients, the
optimizer state and the loss stay in fp32 (keep_trainable_fp32; train/loss.py takes the
softmax in fp32). Without those instructions bf16 is emulated and slower than fp32, so auto
keeps fp32 there, and an explicit bf16 is refused.
"""

from __future__ import annotations

from pathlib import Path

BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # /proc/cpuinfo: x86 flags, Arm features


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return set()
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return flags


def cpu_has_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes bf16 natively (Linux /proc/cpuinfo; False elsewhere)."""
    return bool(cpu_flags(cpuinfo) & BF16_FLAGS)


def keep_trainable_fp32(model) -> int:
    """Put every trainable parameter (the LoRA weights) in fp32, so their gradients and the
    optimizer state are fp32 too; returns how many were cast."""
    import torch

    cast = 0
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
            cast += 1
    return cast
