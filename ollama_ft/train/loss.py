"""The loss where the labels are: logits only for trained (assistant) positions.

DeepSeek vocabularies have 100k-150k entries, so the output projection and the softmax over
it dominate small and medium models. The usual path computes [batch, seq, vocab] logits and
then ignores most of them; here the decoder's hidden states are gathered at the positions
whose next token is a label, and only those rows go through lm_head and cross-entropy. The
result is the same loss (sum over label tokens / number of label tokens).
"""

from __future__ import annotations


def causal_lm_parts(model):
    """(decoder, lm_head) of a PEFT-wrapped or plain *ForCausalLM model."""
    m = model
    for attr in ("module",):  # DDP wrapper
        m = getattr(m, attr, m)
    if hasattr(m, "get_base_model"):
        m = m.get_base_model()
    return m.model, m.lm_head


def selective_lm_loss(model, inputs: dict, num_items_in_batch=None):
    import torch
    import torch.nn.functional as F

    labels = inputs["labels"]
    decoder, lm_head = causal_lm_parts(model)
    kwargs = {k: v for k, v in inputs.items() if k != "labels"}
    hidden = decoder(**kwargs, use_cache=False).last_hidden_state
    target = labels[:, 1:]
    keep = target != -100
    h = hidden[:, :-1][keep]
    logits = lm_head(h).float()
    loss = F.cross_entropy(logits, target[keep], reduction="sum")
    if num_items_in_batch is None:
        return loss / keep.sum().clamp(min=1)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch
