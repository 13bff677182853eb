"""LoRA dropout with a cheaper mask.

PEFT applies `nn.Dropout` to the input of every LoRA adapter (seven per decoder layer, and
again when gradient checkpointing recomputes a layer). On the CPU, torch's dropout draws one
Bernoulli sample per element (~7 ns each on this project's machines) and keeps a float mask
for the backward pass; at 0.3B parameters that is about a sixth of a training step. Here the
mask comes from 16 random bits per element (two elements per 32-bit draw, ~2.5x cheaper) and
is kept as booleans. The drop probability is p rounded to a multiple of 1/65536 (0.05 ->
0.0500031), and the scale 1/(1-p) uses the rounded value, so the expectation is exact.
The module holds no weights: adapters save and load exactly as before.
"""

from __future__ import annotations

import math

import torch


class MaskedScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, drop, scale):
        ctx.save_for_backward(drop)
        ctx.scale = scale
        return x.mul(scale).masked_fill_(drop, 0.0)

    @staticmethod
    def backward(ctx, grad):
        (drop,) = ctx.saved_tensors
        return grad.mul(ctx.scale).masked_fill_(drop, 0.0), None, None


def drop_mask(shape, cut: int, device):
    """(drop mask, scale): each element dropped with probability cut/65536, from 16 random bits."""
    n = math.prod(shape)
    words = torch.randint(-2**31, 2**31 - 1, ((n + 1) // 2,), dtype=torch.int32, device=device)
    halves = words.view(torch.int16)[:n].view(shape)  # uniform on [-32768, 32767]
    return halves < cut - 32768, 65536 / (65536 - cut)


class FastDropout(torch.nn.Module):
    """Drop-in for nn.Dropout on LoRA inputs (see the module docstring)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.cut = round(p * 65536)  # p in units of 2^-16

    def forward(self, x):
        if not self.training or self.cut == 0:
            return x
        if self.cut >= 65536:  # p within 2^-17 of 1: everything dropped
            return x * 0.0
        drop, scale = drop_mask(x.shape, self.cut, x.device)
        return MaskedScale.apply(x, drop, scale)

    def extra_repr(self):
        return f"p={self.p}"


def use_fast_lora_dropout(model) -> int:
    """Swap every LoRA adapter's nn.Dropout (p > 0) for FastDropout; returns how many."""
    swapped = 0
    for module in model.modules():
        drops = getattr(module, "lora_dropout", None)
        if not isinstance(drops, torch.nn.ModuleDict):
            continue
        for name, drop in list(drops.items()):
            if type(drop) is torch.nn.Dropout and drop.p > 0:
                drops[name] = FastDropout(drop.p)
                swapped += 1
    return swapped
