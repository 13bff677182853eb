"""The loss where the labels are: logits only for trained (assistant) positions, in chunks.

DeepSeek vocabularies have 100k-150k entries, so the output projection and the softmax over
it dominate small and medium models, in time and in memory: [batch, seq, vocab] fp32 logits
are 1.2 GB for 4 x 512 tokens of a 152k vocabulary, and autograd keeps several copies. Here
the decoder's hidden states are gathered at the positions whose next token is a label, and
the projection + cross-entropy run chunk by chunk. The gradient is computed in the same pass
(the loss is the last node of the graph, so d loss / d logits = softmax - onehot is known in
the forward): backward only scales it by the incoming gradient, and the logits are never
recomputed. The result is the same loss (sum over label tokens / number of label tokens) and
the same gradients, with the memory of one chunk of logits and one vocabulary matmul fewer.
"""

from __future__ import annotations

import torch

from ollama_ft.data.tokenize import IGNORE

CHUNK_ELEMENTS = 1 << 25  # logits elements per chunk (128 MiB in fp32)


def causal_lm(model):
    """The *ForCausalLM model under DDP/FSDP and PEFT wrappers."""
    m = getattr(model, "module", model)  # DDP / FSDP wrapper
    if hasattr(m, "get_base_model"):
        m = m.get_base_model()
    return m


def install_selective_forward(model) -> None:
    """Let the causal LM's own forward compute the loss at label positions when called with
    `selective_labels=`: returns (sum of token losses, number of label tokens).

    The loss must be computed inside the forward of the model the Trainer wrapped: DDP
    all-reduces the gradients of what ran through its forward, and FSDP/ZeRO-3 gather the
    sharded weights only there. Calling the inner decoder directly, as a loss function
    naturally would, trains each rank alone. The output projection, too, is called as a
    module (linear_cross_entropy_sum): accelerate's FSDP2 shards lm_head in a unit of its own
    and ZeRO-3 gathers each module's weights in that module's forward hook, so reading
    lm_head.weight from outside would read a shard.
    """
    lm = causal_lm(model)
    if getattr(lm, "_ollama_ft_selective", False):
        return
    original = lm.forward

    def forward(*args, selective_labels=None, **kwargs):
        if selective_labels is None:
            return original(*args, **kwargs)
        kwargs = {k: v for k, v in kwargs.items() if v is not None and k not in (
            "labels", "return_dict", "use_cache", "output_attentions", "output_hidden_states")}
        hidden = lm.model(*args, **kwargs, use_cache=False).last_hidden_state
        target = selective_labels[:, 1:]
        keep = target != IGNORE
        return linear_cross_entropy_sum(hidden[:, :-1][keep], lm.lm_head, target[keep]), keep.sum()

    lm.forward = forward
    lm._ollama_ft_selective = True


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i @ W^T, t_i) without materialising all logits; gradients computed in
    the forward pass, chunk by chunk."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk, need_h, need_w):
        with torch.autocast(h.device.type, enabled=False):  # dtypes are chosen here
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            # gradients kept in fp32 until the incoming gradient (1/n, a loss scale) is
            # applied in backward
            grad_h = torch.empty(h.shape, dtype=torch.float32, device=h.device) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
            for s in range(0, h.shape[0], chunk):
                hc, t = h[s:s + chunk], targets[s:s + chunk]
                logits = (hc.to(weight.dtype) @ weight.t()).float()
                top = logits.amax(dim=1, keepdim=True)
                logits.sub_(top)  # in place: one chunk of logits is all that is ever held
                picked = logits.gather(1, t[:, None])
                logits.exp_()
                norm = logits.sum(dim=1, keepdim=True)
                total += (norm.log() - picked).sum()
                if need_h or need_w:
                    # d loss / d logits = softmax - onehot, formed in fp32 (so confident
                    # tokens keep their small gradient in bf16 too), then one matmul each
                    logits.div_(norm)
                    logits[torch.arange(t.shape[0], device=t.device), t] -= 1.0
                    if need_h:
                        grad_h[s:s + chunk] = logits.to(weight.dtype) @ weight
                    if need_w:
                        grad_w += logits.t() @ hc.float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = h.dtype, weight.dtype
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        gh = (grad_h * grad_out).to(h_dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(w_dtype) if grad_w is not None else None
        return gh, gw, None, None, None, None


def _is_plain_linear(module) -> bool:
    """A bias-free nn.Linear, or the same under a sharding wrapper (FSDP2 swaps the class for
    a subclass that keeps Linear.forward); quantized or adapter-wrapped heads are not."""
    return (isinstance(module, torch.nn.Linear) and module.bias is None
            and type(module).forward is torch.nn.Linear.forward)


def _install_chunked_head(lm_head) -> None:
    """Let `lm_head(h, ce_targets=t)` return the chunked cross-entropy sum. Going through the
    module's call runs the hooks of FSDP2 / ZeRO-3 that gather its weight first, so
    lm_head.weight is whole inside; without ce_targets it is the plain projection."""
    if lm_head.__dict__.get("_ollama_ft_chunked"):
        return

    def forward(x, ce_targets=None):
        if ce_targets is None:
            return torch.nn.Linear.forward(lm_head, x)
        weight = lm_head.weight
        chunk = CHUNK_ELEMENTS // weight.shape[0]
        if weight.element_size() < 4:  # a bf16 logits chunk is made before its fp32 copy:
            chunk = chunk * 2 // 3  # the two together take what one fp32 chunk takes
        chunk = max(16, chunk)
        grad_on = torch.is_grad_enabled()
        with torch.profiler.record_function("linear_cross_entropy"):  # named in profiles
            return ChunkedLinearCrossEntropy.apply(x, weight, ce_targets, chunk, grad_on and x.requires_grad,
                             grad_on and weight.requires_grad)

    lm_head.forward = forward
    lm_head._ollama_ft_chunked = True


def linear_cross_entropy_sum(h, lm_head, targets):
    """Sum of token cross-entropies of lm_head(h) against targets."""
    F = torch.nn.functional

    if _is_plain_linear(lm_head):
        _install_chunked_head(lm_head)
        return lm_head(h, ce_targets=targets)
    # a wrapped or quantized head: plain logits, still only at label positions
    return F.cross_entropy(lm_head(h).float(), targets, reduction="sum")


def selective_lm_loss(model, inputs: dict, num_items_in_batch=None):
    """Mean token loss at the label positions, through `model`'s own forward (wrappers
    included: see install_selective_forward)."""
    install_selective_forward(model)
    kwargs = {k: v for k, v in inputs.items() if k != "labels"}
    loss, count = model(**kwargs, selective_labels=inputs["labels"])
    if num_items_in_batch is None:
        return loss / count.clamp(min=1)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch
