"""DeepSeek-V2 and V3 (MLA + MoE) into a GGUF `deepseek2`, laid out as llama.cpp's own converter
does (conversion/deepseek.py of the llama.cpp Ollama 0.33 runs, b10488, and of the one
llama-cpp-python ships):

- MLA is written as MQA with one KV head of kv_lora_rank + qk_rope_head_dim (key) and
  kv_lora_rank (value), the per-head MLA sizes in key_length_mla / value_length_mla;
- kv_b_proj [heads * (nope + v), kv_lora_rank] is split per head into attn_k_b
  (heads, kv_lora_rank, nope: the key part, transposed) and attn_v_b (heads, v, kv_lora_rank),
  which llama.cpp's absorbed MLA multiplies with;
- the routed experts' gate/up/down matrices are stacked into 3-D ffn_*_exps tensors;
- the MoE and YaRN metadata: leading dense layers, expert counts and sizes, routing scale
  and normalisation, yarn_log_multiplier = 0.1 * mscale_all_dim (llama.cpp's convention);
- V3 (and R1, its fine-tune): q compressed (q_a_proj, q_a_layernorm, q_b_proj), sigmoid
  routing with a per-expert score bias (e_score_correction_bias -> exp_probs_b) and
  group-limited expert choice (n_group, topk_group).

The merged LoRA delta is added before the split and the stacking (model.rows)."""

from __future__ import annotations

import re

import numpy as np

from ollama_ft.export.errors import UnsupportedModelError

EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
KV_B = re.compile(r"^model\.layers\.(\d+)\.self_attn\.kv_b_proj\.weight$")
SCORE_BIAS = re.compile(r"^model\.layers\.(\d+)\.mlp\.gate\.e_score_correction_bias$")
EXPERT_GGUF = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}


def hparams(config: dict, common: list[tuple[str, object, type]], where: str):
    """The common hyperparameters with deepseek2's MLA and MoE ones in place."""
    from gguf import Keys

    arch = "deepseek2"

    def k(template):
        return template.format(arch=arch)

    need = ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")
    missing = [n for n in need if config.get(n) is None]
    if missing:
        raise UnsupportedModelError(f"{where}: config.json has no {', '.join(missing)} "
                                    "(needed for a DeepSeek-V2 GGUF)")
    rank, rope = int(config["kv_lora_rank"]), int(config["qk_rope_head_dim"])
    nope, v = int(config["qk_nope_head_dim"]), int(config["v_head_dim"])
    drop = {k(Keys.Attention.HEAD_COUNT_KV), k(Keys.Rope.DIMENSION_COUNT),
            k(Keys.Attention.KEY_LENGTH), k(Keys.Attention.VALUE_LENGTH)}
    out = [item for item in common if item[0] not in drop]
    out += [(k(Keys.Attention.HEAD_COUNT_KV), 1, int),  # MLA as MQA
            (k(Keys.Rope.DIMENSION_COUNT), rope, int),
            (k(Keys.Attention.KV_LORA_RANK), rank, int),
            (k(Keys.Attention.KEY_LENGTH), rank + rope, int),
            (k(Keys.Attention.VALUE_LENGTH), rank, int),
            (k(Keys.Attention.KEY_LENGTH_MLA), nope + rope, int),
            (k(Keys.Attention.VALUE_LENGTH_MLA), v, int)]
    if config.get("q_lora_rank") is not None:
        out.append((k(Keys.Attention.Q_LORA_RANK), int(config["q_lora_rank"]), int))
    n_experts = config.get("n_routed_experts")
    dense = config.get("first_k_dense_replace")
    if dense is None:
        dense = config["num_hidden_layers"] if n_experts is None else 0
    out.append((k(Keys.LLM.LEADING_DENSE_BLOCK_COUNT), int(dense), int))
    out.append((k(Keys.LLM.EXPERT_FEED_FORWARD_LENGTH),
                int(config.get("moe_intermediate_size") or config["intermediate_size"]), int))
    if n_experts is not None:
        out.append((k(Keys.LLM.EXPERT_COUNT), int(n_experts), int))
        out.append((k(Keys.LLM.EXPERT_USED_COUNT), int(config["num_experts_per_tok"]), int))
    out.append((k(Keys.LLM.EXPERT_SHARED_COUNT), int(config.get("n_shared_experts") or 0), int))
    if config.get("routed_scaling_factor") is not None:
        out.append((k(Keys.LLM.EXPERT_WEIGHTS_SCALE), float(config["routed_scaling_factor"]), float))
    if config.get("norm_topk_prob"):
        out.append((k(Keys.LLM.EXPERT_WEIGHTS_NORM), True, bool))
    v3 = config.get("model_type") == "deepseek_v3"
    method = config.get("topk_method") or ("noaux_tc" if v3 else "greedy")
    if method not in ("greedy", "noaux_tc"):
        raise UnsupportedModelError(f"{where}: topk_method {method!r}: export supports "
                                    "V2-Lite's greedy and V3's noaux_tc expert routing")
    if config.get("n_group") is not None:
        out.append((k(Keys.LLM.EXPERT_GROUP_COUNT), int(config["n_group"]), int))
    if config.get("topk_group") is not None:
        out.append((k(Keys.LLM.EXPERT_GROUP_USED_COUNT), int(config["topk_group"]), int))
    # transformers' V3 always routes by sigmoid (its config has no scoring_func); V2 by softmax
    gating = config.get("scoring_func") or ("sigmoid" if v3 else "softmax")
    if gating not in ("softmax", "sigmoid"):
        raise UnsupportedModelError(f"{where}: scoring_func {gating!r} is not supported")
    out.append((k(Keys.LLM.EXPERT_GATING_FUNC), 2 if gating == "sigmoid" else 1, int))
    from ollama_ft.export.gguf import rope_scaling

    rs = rope_scaling(config) or {}
    if rs.get("mscale_all_dim"):
        out.append((k(Keys.Rope.SCALING_YARN_LOG_MUL), 0.1 * float(rs["mscale_all_dim"]), float))
    return out


def special_tensors(model, config: dict, out_type: str, where: str):
    """(plans, source names they consume): the stacked experts and the split kv_b."""
    from ollama_ft.export.gguf import TensorPlan, _nbytes, _tensor_type

    names = list(model.ckpt.names())
    plans, used = [], set()
    experts: dict[tuple[int, str], dict[int, str]] = {}
    for name in names:
        m = EXPERT.match(name)
        if m:
            experts.setdefault((int(m.group(1)), m.group(3)), {})[int(m.group(2))] = name
    n_experts = int(config.get("n_routed_experts") or 0)
    for (bid, proj), by_id in sorted(experts.items()):
        if sorted(by_id) != list(range(n_experts)):
            raise UnsupportedModelError(f"{where}: layer {bid} has experts {sorted(by_id)} of "
                                        f"{proj}, expected 0..{n_experts - 1}")
        srcs = [by_id[i] for i in range(n_experts)]
        rows, cols = model.ckpt.info(srcs[0]).shape
        shape = (n_experts, rows, cols)
        qtype = _tensor_type(shape, out_type)

        def stack(srcs=srcs, rows=rows):
            out = np.stack([model.rows(s, 0, rows) for s in srcs])
            for s in srcs:
                model.release(s)
            return out
        plans.append(TensorPlan(f"blk.{bid}.{EXPERT_GGUF[proj]}.weight", shape, qtype,
                                _nbytes(shape, qtype), None, generate=stack))
        used.update(srcs)
    heads = int(config["num_attention_heads"])
    nope, v = int(config["qk_nope_head_dim"]), int(config["v_head_dim"])
    for name in names:
        m = KV_B.match(name)
        if not m:
            continue
        rows, rank = model.ckpt.info(name).shape
        if rows != heads * (nope + v):
            raise UnsupportedModelError(f"{where}: {name} has {rows} rows, expected "
                                        f"heads * (qk_nope_head_dim + v_head_dim) = {heads * (nope + v)}")
        bid = int(m.group(1))

        def part(which, name=name, rows=rows, rank=rank):
            kv = model.rows(name, 0, rows).reshape(heads, nope + v, rank)
            if which == "k":
                return np.ascontiguousarray(kv[:, :nope, :].transpose(0, 2, 1))  # (heads, rank, nope)
            return np.ascontiguousarray(kv[:, nope:, :])  # (heads, v, rank)
        for which, gname, shape in (("k", "attn_k_b", (heads, rank, nope)),
                                    ("v", "attn_v_b", (heads, v, rank))):
            qtype = _tensor_type(shape, out_type)
            plans.append(TensorPlan(f"blk.{bid}.{gname}.weight", shape, qtype, _nbytes(shape, qtype),
                                    None, generate=lambda which=which, part=part: part(which)))
        used.add(name)
    for name in names:  # V3's routing bias (named *_bias, so gguf-py's map misses it)
        m = SCORE_BIAS.match(name)
        if m:
            shape = tuple(model.ckpt.info(name).shape)
            qtype = _tensor_type(shape, "F32")
            plans.append(TensorPlan(f"blk.{int(m.group(1))}.exp_probs_b.bias", shape, qtype,
                                    _nbytes(shape, qtype), name))
            used.add(name)
    return plans, used


# What llama.cpp's deepseek2 graph (b10488 and the llama-cpp-python build) applies a LoRA
# adapter to: o_proj (through build_attn) and the MLPs (build_ffn / build_moe_ffn). The MLA
# input projections (q, q_a, q_b, kv_a_mqa) and the split k_b/v_b are plain matrix products
# there, so an adapter.gguf cannot carry their deltas: the merged GGUF can.
ADAPTER_SAFE = re.compile(r"\.(self_attn\.o_proj|mlp\.(shared_experts\.)?(gate_proj|up_proj|down_proj))\.weight$")


def check_adapter_targets(modules, where) -> None:
    from ollama_ft.export.errors import AdapterError

    bad = sorted({n.split(".")[-2] for n in modules if not ADAPTER_SAFE.search(n)})
    if bad:
        raise AdapterError(f"{where}: the adapter changes {', '.join(bad)}; llama.cpp applies "
                           "LoRA adapters to DeepSeek-V2's o_proj and MLP weights only (its MLA "
                           "projections are no LoRA-aware matrix products), so this adapter cannot "
                           "be an adapter.gguf. Export the merged model (drop --adapter-only / "
                           "--adapter), or train with --lora-targets o_proj,gate_proj,up_proj,"
                           "down_proj to ship it as an adapter")
