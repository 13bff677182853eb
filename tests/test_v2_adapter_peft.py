"""adapter/ of a DeepSeek-V2 (deepseek2 / deepseek3) run is a PEFT adapter: plain
`PeftModel.from_pretrained(base, RUN/adapter)` loads it as it was trained (issue #22 item 4).

PEFT on transformers 5 retargets gate_proj/up_proj/down_proj onto the routed experts' fused
parameters (and refuses them with lora_dropout != 0); train/lora.py saves those MLP layers as
target_parameters instead. A tiny 2-layer V2-Lite-shaped model (a dense layer, then routed +
shared experts), an untrained adapter with random non-zero lora_B, saved as training saves it.
"""

from __future__ import annotations

import json

import pytest

from ollama_ft.config import RunConfig

IDS = [100000, 17464, 1165, 28, 3207, 185, 10897, 13, 42, 7, 100001]
TOL = 1e-4  # fp32; measured ~1e-6


def _trained_like(base, architecture: str, run_dir, **cfg):
    """The train stage's PEFT model (lora_config, exact_targets), lora_B made non-zero, saved
    with the train stage's _save_adapter; returns (model in eval mode, adapter dir)."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from ollama_ft.train.lora import exact_targets, lora_config
    from ollama_ft.train.trainer import _save_adapter

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with exact_targets(architecture):
        model = get_peft_model(model, lora_config(RunConfig(**cfg), architecture))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn_like(p) * 0.05)
    run_dir.mkdir(parents=True, exist_ok=True)
    return model.eval(), _save_adapter(model, run_dir)


def _logits(model):
    import torch

    with torch.no_grad():
        return model(torch.tensor([IDS])).logits[0]


def _adapted(model) -> set[str]:
    """Module paths (relative to the base model) that hold a LoRA lora_A."""
    return {name.removeprefix("base_model.model.").rsplit(".lora_A", 1)[0]
            for name, _ in model.named_parameters() if ".lora_A." in name}


@pytest.fixture(scope="module")
def v2_base(tiny_base):
    return tiny_base("v2-lite", layers=2)


def test_v2_adapter_loads_with_plain_peft_as_trained(v2_base, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ollama_ft.export.merge import load_adapter

    trained, adapter = _trained_like(v2_base, "deepseek2", tmp_path / "run")  # lora_dropout 0.05
    want = _logits(trained)
    trained_layers = _adapted(trained)
    # the run adapted the dense MLP and the shared experts' MLP (nn.Linear), never routed experts
    assert {"model.layers.0.mlp.gate_proj", "model.layers.1.mlp.shared_experts.down_proj",
            "model.layers.1.self_attn.kv_b_proj"} <= trained_layers
    assert not any(".experts." in n for n in trained_layers)

    plain = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(v2_base, dtype=torch.float32), adapter).eval()
    assert _adapted(plain) == trained_layers
    got = _logits(plain)
    assert (got - want).abs().max().item() <= TOL
    base = AutoModelForCausalLM.from_pretrained(v2_base, dtype=torch.float32).eval()
    assert (_logits(base) - want).abs().max().item() > 100 * TOL  # the adapter does something
    assert (_logits(plain.merge_and_unload()) - want).abs().max().item() <= TOL

    # the export reads the same LoRA pairs (same tensor names) from the saved form
    assert {m.removesuffix(".weight") for m in load_adapter(adapter).modules} == trained_layers


def test_v2_lora_on_mlp_only_loads_with_plain_peft(v2_base, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    trained, adapter = _trained_like(v2_base, "deepseek2", tmp_path / "run", lora_r=4,
                                     rslora=True, lora_targets=["up_proj", "down_proj"])
    plain = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(v2_base, dtype=torch.float32), adapter).eval()
    assert _adapted(plain) == _adapted(trained)
    assert (_logits(plain) - _logits(trained)).abs().max().item() <= TOL


def test_other_families_save_adapters_as_before(tiny_base, tmp_path):
    from peft import LoraConfig

    from ollama_ft.train.lora import LINEAR_TARGETS, lora_config

    assert type(lora_config(RunConfig(), "qwen2")) is LoraConfig
    _, adapter = _trained_like(tiny_base("r1-qwen"), "qwen2", tmp_path / "run")
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(LINEAR_TARGETS["qwen2"])
    assert config["lora_dropout"] == pytest.approx(0.05) and not config.get("target_parameters")


def test_plain_peft_form_leaves_what_it_cannot_or_need_not_change():
    from ollama_ft.train.lora import plain_peft_form

    attention_only = {"target_modules": ["q_proj", "o_proj"], "lora_dropout": 0.1}
    assert plain_peft_form(attention_only) == attention_only
    dora = {"target_modules": ["q_proj", "gate_proj"], "lora_dropout": 0.1, "use_dora": True}
    assert plain_peft_form(dora) == dora  # lora.ParamWrapper cannot do DoRA
    regex = {"target_modules": r".*\.q_proj", "lora_dropout": 0.1}
    assert plain_peft_form(regex) == regex
    out = plain_peft_form({"target_modules": ["q_proj", "gate_proj", "down_proj"],
                           "lora_dropout": 0.1})
    assert out == {"target_modules": ["q_proj"], "lora_dropout": 0.0,
                   "target_parameters": ["down_proj.weight", "gate_proj.weight"]}
