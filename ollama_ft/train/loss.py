"""The loss where the labels are: logits only for trained (assistant) positions, in chunks.

DeepSeek vocabularies have 100k-150k entries, so the output projection and the softmax over
it dominate small and medium models, in time and in memory: [batch, seq, vocab] fp32 logits
are 1.2 GB for 4 x 512 tokens of a 152k vocabulary, and autograd keeps several copies. Here
the decoder's hidden states are gathered at the positions whose next token is a label, and
the projection + cross-entropy run chunk by chunk; the backward pass recomputes each chunk's
logits instead of keeping them. The result is the same loss (sum over label tokens / number
of label tokens) and the same gradients, with memory of one chunk of logits.
"""

from __future__ import annotations

CHUNK_ELEMENTS = 1 << 25  # logits elements per chunk (128 MiB in fp32)


def causal_lm_parts(model):
    """(decoder, lm_head) of a PEFT-wrapped or plain *ForCausalLM model."""
    m = getattr(model, "module", model)  # DDP wrapper
    if hasattr(m, "get_base_model"):
        m = m.get_base_model()
    return m.model, m.lm_head


def _chunked_ce_function():
    import torch

    class ChunkedLinearCrossEntropy(torch.autograd.Function):
        """sum_i CE(h_i @ W^T, t_i) without materialising all logits."""

        @staticmethod
        def forward(ctx, h, weight, targets, chunk):
            n = h.shape[0]
            lse = torch.empty(n, dtype=torch.float32, device=h.device)
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            for s in range(0, n, chunk):
                logits = (h[s:s + chunk] @ weight.t()).float()
                lse[s:s + chunk] = torch.logsumexp(logits, dim=-1)
                picked = logits.gather(1, targets[s:s + chunk, None]).squeeze(1)
                total += (lse[s:s + chunk] - picked).sum()
            ctx.save_for_backward(h, weight, targets, lse)
            ctx.chunk = chunk
            return total

        @staticmethod
        def backward(ctx, grad_out):
            h, weight, targets, lse = ctx.saved_tensors
            need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            grad_h = torch.empty_like(h) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
            for s in range(0, h.shape[0], ctx.chunk):
                e = min(s + ctx.chunk, h.shape[0])
                probs = torch.exp((h[s:e] @ weight.t()).float() - lse[s:e, None])
                probs[torch.arange(e - s, device=h.device), targets[s:e]] -= 1.0
                probs = (probs * grad_out).to(h.dtype)
                if need_h:
                    grad_h[s:e] = probs @ weight
                if need_w:
                    grad_w += probs.t().float() @ h[s:e].float()
            return grad_h, grad_w.to(weight.dtype) if need_w else None, None, None

    return ChunkedLinearCrossEntropy


_FN = None


def linear_cross_entropy_sum(h, lm_head, targets):
    """Sum of token cross-entropies of lm_head(h) against targets."""
    import torch
    import torch.nn.functional as F

    global _FN
    if type(lm_head) is torch.nn.Linear and lm_head.bias is None:
        if _FN is None:
            _FN = _chunked_ce_function()
        chunk = max(16, CHUNK_ELEMENTS // lm_head.weight.shape[0])
        return _FN.apply(h, lm_head.weight, targets, chunk)
    # a wrapped or quantized head: plain logits, still only at label positions
    return F.cross_entropy(lm_head(h).float(), targets, reduction="sum")


def selective_lm_loss(model, inputs: dict, num_items_in_batch=None):
    import torch

    labels = inputs["labels"]
    decoder, lm_head = causal_lm_parts(model)
    kwargs = {k: v for k, v in inputs.items() if k != "labels"}
    hidden = decoder(**kwargs, use_cache=False).last_hidden_state
    target = labels[:, 1:]
    keep = target != -100
    loss = linear_cross_entropy_sum(hidden[:, :-1][keep], lm_head, target[keep])
    if num_items_in_batch is None:
        return loss / keep.sum().clamp(min=1)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch
