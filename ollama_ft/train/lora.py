"""PEFT LoRA configuration per architecture."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

from peft import LoraConfig
from peft.utils import CONFIG_NAME

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
    targets = cfg.lora_targets or list(LINEAR_TARGETS[architecture])
    unknown = sorted(set(targets) - set(LINEAR_TARGETS[architecture]))
    if unknown:
        raise ConfigError(f"lora_targets: {', '.join(unknown)} not in {architecture}'s linear "
                          f"layers ({', '.join(LINEAR_TARGETS[architecture])})")
    config_class = PlainPeftLoraConfig if architecture in MOE_FUSED else LoraConfig
    return config_class(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        target_modules=list(targets), use_dora=cfg.dora,
                        use_rslora=cfg.rslora, bias="none", task_type="CAUSAL_LM")


# --- adapter/ as plain PEFT loads it ------------------------------------------------------
# The architectures whose routed experts transformers 5 fuses (see exact_targets), and the MLP
# names PEFT retargets onto them.
MOE_FUSED = ("deepseek2", "deepseek3")
MLP_NAMES = ("gate_proj", "up_proj", "down_proj")


def plain_peft_form(config: dict) -> dict:
    """A deepseek2/deepseek3 adapter_config.json that a plain `PeftModel.from_pretrained`
    loads as the run trained it.

    Given gate_proj/up_proj/down_proj in target_modules, PEFT (0.21, transformers 5) targets
    the routed experts' fused parameters instead of the dense and shared-expert nn.Linear
    layers of those names, whether they are written as names or as a regex (it resolves a
    regex to leaf names first); with lora_dropout != 0 it then refuses the experts, and with
    0 it would drop the trained MLP weights. So the MLP layers are written as target_parameters
    ("gate_proj.weight": the weight of every module named gate_proj; the routed experts' fused
    parameters are "experts.gate_up_proj" and "experts.down_proj", which it does not match):
    PEFT wraps those weights (lora.ParamWrapper) with the same lora_A/lora_B tensors under the
    same names, and adds scale * B @ A to the weight, as the trained nn.Linear LoRA does.
    ParamWrapper needs lora_dropout 0 (dropout only acts in training; run.yaml keeps the
    value trained with) and cannot do DoRA: a DoRA adapter is left as it is (it loads inside
    exact_targets only)."""
    targets = config.get("target_modules")
    if config.get("use_dora") or not isinstance(targets, (list, tuple, set)):
        return config
    mlp = sorted(t for t in targets if t in MLP_NAMES)
    if not mlp:
        return config
    parameters = set(config.get("target_parameters") or ()) | {f"{t}.weight" for t in mlp}
    return {**config, "target_modules": sorted(t for t in targets if t not in MLP_NAMES),
            "target_parameters": sorted(parameters), "lora_dropout": 0.0}


class PlainPeftLoraConfig(LoraConfig):
    """peft.LoraConfig that trains as itself and saves its adapter_config.json in
    plain_peft_form (adapter/ and the trainer's checkpoints alike)."""

    def save_pretrained(self, save_directory, **kwargs):
        super().save_pretrained(save_directory, **kwargs)
        path = Path(save_directory) / CONFIG_NAME
        config = json.loads(path.read_text(encoding="utf-8"))
        path.write_text(json.dumps(plain_peft_form(config), indent=2, sort_keys=True),
                        encoding="utf-8")


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
