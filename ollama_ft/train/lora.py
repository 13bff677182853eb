"""PEFT LoRA configuration per architecture."""

from __future__ import annotations

from ollama_ft.errors import ConfigError

# every linear projection of the decoder blocks (the lm_head and embeddings stay frozen)
LINEAR_TARGETS = {
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "qwen3": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}


def lora_config(cfg, architecture: str):
    from peft import LoraConfig

    targets = cfg.lora_targets or list(LINEAR_TARGETS[architecture])
    unknown = sorted(set(targets) - set(LINEAR_TARGETS[architecture]))
    if unknown:
        raise ConfigError(f"lora_targets: {', '.join(unknown)} not in {architecture}'s linear "
                          f"layers ({', '.join(LINEAR_TARGETS[architecture])})")
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(targets), use_dora=cfg.dora, use_rslora=cfg.rslora,
                      bias="none", task_type="CAUSAL_LM")
