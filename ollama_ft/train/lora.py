"""PEFT LoRA configuration per architecture."""

from __future__ import annotations

from contextlib import contextmanager

from ollama_ft.errors import ConfigError

# every linear projection of the decoder blocks (the lm_head and embeddings stay frozen)
LINEAR_TARGETS = {
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "qwen3": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    # MLA's projections (q_proj, or q_a_proj/q_b_proj where q is compressed), the dense MLPs
    # and the shared experts (nn.Linear). The routed experts are fused 3-D parameters in
    # transformers 5 (experts.gate_up_proj / experts.down_proj), not linear layers: LoRA
    # does not reach them here (PEFT could only through target_parameters, which our
    # export's merge does not map back onto the per-expert checkpoint tensors).
    "deepseek2": ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
                  "gate_proj", "up_proj", "down_proj"),
}
LINEAR_TARGETS["deepseek3"] = LINEAR_TARGETS["deepseek2"]  # V3 / R1: the same projections


def lora_config(cfg, architecture: str):
    from peft import LoraConfig

    targets = cfg.lora_targets or list(LINEAR_TARGETS[architecture])
    unknown = sorted(set(targets) - set(LINEAR_TARGETS[architecture]))
    if unknown:
        raise ConfigError(f"lora_targets: {', '.join(unknown)} not in {architecture}'s linear "
                          f"layers ({', '.join(LINEAR_TARGETS[architecture])})")
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(targets), use_dora=cfg.dora,
                      use_rslora=cfg.rslora, bias="none", task_type="CAUSAL_LM")


@contextmanager
def exact_targets(architecture: str):
    """Around get_peft_model / PeftModel.from_pretrained: PEFT (0.21, on transformers 5)
    rewrites the gate_proj/up_proj/down_proj targets of a MoE model whose experts transformers
    fused (deepseek_v2 among them) into the routed experts' fused parameters, and drops them as
    modules, so the dense layer's and the shared experts' MLPs would get no LoRA and the routed
    experts one our export cannot merge. For deepseek2 the targets mean the linear layers of
    those names (the routed experts are none); this keeps PEFT from rewriting them."""
    if architecture not in ("deepseek2", "deepseek3"):
        yield
        return
    import peft.utils.transformers_weight_conversion as conversion

    original = conversion.convert_peft_config_for_transformers
    conversion.convert_peft_config_for_transformers = lambda *args, **kwargs: None
    try:
        yield
    finally:
        conversion.convert_peft_config_for_transformers = original
