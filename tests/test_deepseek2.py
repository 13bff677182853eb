"""DeepSeek-V2-Lite (MLA + MoE) end to end (and the export of V3 / R1 itself, at the end) on a tiny V2-Lite-shaped checkpoint (27 layers,
MLA without q compression, a dense first layer, 4 routed + 2 shared experts, YaRN, the real
DeepSeek-V2 tokenizer): the GGUF llama.cpp runs computes what PyTorch computes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import FACTS, qa_rows, write_jsonl
from test_export_support import gguf_logits, kl_divergence, make_run, read_gguf, top2_margin, torch_logits

from ollama_ft.chat_formats import FORMATS, Message
from ollama_ft.train.lora import LINEAR_TARGETS

F16_TOL = 1e-2  # as the other families; measured 4.3e-3
ADAPTER_SAFE = ["o_proj", "gate_proj", "up_proj", "down_proj"]
CONVERSATION = [Message("system", "You are terse."),
                Message("user", "What is the capital of Zorbia? 请用中文回答。"),
                Message("assistant", "Quellport."),
                Message("user", "def f(x):\n\treturn x  +  1  # 🚀 42")]


@pytest.fixture(scope="module")
def v2(tiny_base, tmp_path_factory):
    from transformers import AutoTokenizer

    from ollama_ft.export import export_stage

    base = tiny_base("v2-lite")
    run = make_run(base, tmp_path_factory.mktemp("v2-run"), "deepseek-llm",
                   targets=LINEAR_TARGETS["deepseek2"])
    export_stage(run, quants="f16,q8_0", log=lambda *a: None)
    tok = AutoTokenizer.from_pretrained(base)
    ids = tok(FORMATS["deepseek-llm"].render_prompt(CONVERSATION), add_special_tokens=False)["input_ids"]
    return base, run, ids


def test_the_catalogue_trains_v2_lite():
    from ollama_ft import catalog

    for alias in ("deepseek-v2:16b", "deepseek-coder-v2:16b"):
        entry = catalog.lookup_alias(alias)
        assert entry.supported and entry.architecture == "deepseek2"
        assert entry.chat_format == "deepseek-llm"  # the V2 chat template is deepseek-llm's
    assert catalog.ARCHITECTURES["DeepseekV2ForCausalLM"] == ("deepseek2", "deepseek2")


def test_v2_chat_template_is_the_deepseek_llm_format(tiny_base):
    from transformers import AutoTokenizer

    from ollama_ft.data.tokenize import verify_chat_format
    from ollama_ft.hub import inspect_checkpoint

    base = tiny_base("v2-lite")
    found = inspect_checkpoint(str(base), base, "local", None, None)
    assert found.architecture == "deepseek2" and found.chat_format.name == "deepseek-llm"
    verify_chat_format(AutoTokenizer.from_pretrained(base), FORMATS["deepseek-llm"], str(base))


def test_f16_logits_match_pytorch(v2):
    base, run, ids = v2
    ref = torch_logits(base, run / "adapter", ids)
    got = gguf_logits(run / "model-f16.gguf", ids)
    diff = np.abs(got - ref).max()
    assert diff <= F16_TOL, diff
    decisive = top2_margin(ref) >= F16_TOL
    assert (got.argmax(-1) == ref.argmax(-1))[decisive].all()
    plain = torch_logits(base, None, ids)
    assert np.abs(plain - ref).max() > 10 * F16_TOL  # the adapter (kv_b_proj too) matters
    kl = kl_divergence(ref, gguf_logits(run / "model-q8_0.gguf", ids))
    assert kl.mean() < 1e-3 and kl.max() < 2e-3


def test_gguf_layout_is_llama_cpps_deepseek2(v2):
    base, run, _ = v2
    config = json.loads((base / "config.json").read_text())
    meta = read_gguf(run / "model-f16.gguf")
    t = meta["__tensors__"]
    assert meta["general.architecture"] == "deepseek2"
    assert meta["deepseek2.attention.head_count_kv"] == 1  # MLA as MQA
    rank, rope = config["kv_lora_rank"], config["qk_rope_head_dim"]
    nope, v, heads = config["qk_nope_head_dim"], config["v_head_dim"], config["num_attention_heads"]
    assert meta["deepseek2.attention.key_length"] == rank + rope
    assert meta["deepseek2.attention.value_length"] == rank
    assert meta["deepseek2.attention.key_length_mla"] == nope + rope
    assert meta["deepseek2.attention.value_length_mla"] == v
    assert meta["deepseek2.rope.dimension_count"] == rope
    assert meta["deepseek2.leading_dense_block_count"] == 1
    assert meta["deepseek2.expert_count"] == 4 and meta["deepseek2.expert_used_count"] == 2
    assert meta["deepseek2.expert_shared_count"] == 2
    assert meta["deepseek2.rope.scaling.type"] == "yarn"
    assert meta["deepseek2.rope.scaling.yarn_log_multiplier"] == pytest.approx(0.0707, rel=1e-4)
    assert meta["tokenizer.ggml.pre"] == "deepseek-llm"
    # ne order (llama.cpp's): k_b {nope, rank, heads}, v_b {rank, v, heads}, experts {in, out, n}
    assert t["blk.0.attn_k_b.weight"][1] == (nope, rank, heads)
    assert t["blk.0.attn_v_b.weight"][1] == (rank, v, heads)
    assert "blk.0.attn_kv_b.weight" not in t and "blk.0.ffn_gate.weight" in t
    hidden, moe = config["hidden_size"], config["moe_intermediate_size"]
    assert t["blk.1.ffn_gate_exps.weight"][1] == (hidden, moe, 4)
    assert t["blk.1.ffn_down_exps.weight"][1] == (moe, hidden, 4)
    assert "blk.1.ffn_gate_shexp.weight" in t and "blk.1.ffn_gate_inp.weight" in t


def test_k_quants_through_llama_cpp(v2):
    from ollama_ft.export import export_stage

    base, run, ids = v2
    out = export_stage(run, quants="q4_k_m", log=lambda *a: None).files["q4_k_m"]
    assert read_gguf(out)["general.file_type"] == 15
    kl = kl_divergence(torch_logits(base, run / "adapter", ids), gguf_logits(out, ids))
    assert kl.mean() < 0.1


def test_adapter_form_only_for_what_llama_cpp_applies(tiny_base, tmp_path):
    """llama.cpp's deepseek2 graph applies LoRA to o_proj and the MLPs only: an adapter on
    the MLA projections is refused as adapter.gguf (the merged GGUF carries it); one on
    o_proj + MLPs applied to base-f16.gguf equals the merged model."""
    from ollama_ft.export import export_stage
    from ollama_ft.export.errors import AdapterError

    base = tiny_base("v2-lite")
    full = make_run(base, tmp_path / "full", "deepseek-llm", targets=LINEAR_TARGETS["deepseek2"])
    with pytest.raises(AdapterError, match="kv_b_proj.*o_proj and MLP weights only"):
        export_stage(full, quants="f16", adapter_only=True, log=lambda *a: None)
    assert not (full / "adapter.gguf").exists()
    safe = make_run(base, tmp_path / "safe", "deepseek-llm", targets=ADAPTER_SAFE)
    export_stage(safe, quants="f16", log=lambda *a: None)
    export_stage(safe, quants="f16", adapter_only=True, log=lambda *a: None)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    ids = tok(FORMATS["deepseek-llm"].render_prompt(CONVERSATION), add_special_tokens=False)["input_ids"]
    merged = gguf_logits(safe / "model-f16.gguf", ids)
    applied = gguf_logits(safe / "base-f16.gguf", ids, lora=safe / "adapter.gguf")
    assert np.abs(merged - applied).max() < 1e-2
    assert np.abs(merged - gguf_logits(safe / "base-f16.gguf", ids)).max() > 0.1


@pytest.mark.slow
def test_trains_and_answers_as_pytorch_through_llama_cpp(tiny_base, tmp_path):
    """ollama-ft train on the V2-Lite-shaped base (packing and the chunked loss on): it
    learns FACTS, and the exported Q8_0 gives PyTorch's greedy answers."""
    from transformers import AutoTokenizer

    from ollama_ft.config import RunConfig
    from ollama_ft.export import export_stage
    from ollama_ft.train.generate import greedy_answer
    from ollama_ft.train.trainer import train_stage
    from test_export_support import llama

    base = tiny_base("v2-lite", hidden=128)
    data = write_jsonl(tmp_path / "d.jsonl", qa_rows(FACTS))
    cfg = RunConfig(name="v2", base=str(base), data=str(data), output_dir=str(tmp_path / "run"),
                    max_steps=60, save_steps=60, lr=3e-3, batch_size=4, warmup=0, lora_dropout=0.0,
                    seed=0, max_len=128, logging_steps=10).validate()
    result = train_stage(cfg, log=lambda *a: None)
    rows = [json.loads(x) for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < 0.5 * losses[0], losses
    report = json.loads((cfg.run_dir / "report.json").read_text())["train"]
    assert report["architecture"] == "deepseek2"
    export_stage(cfg.run_dir, quants="q8_0", log=lambda *a: None)
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ollama_ft.train.lora import exact_targets

    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with exact_targets("deepseek2"):
        model = PeftModel.from_pretrained(model, result.adapter_dir).eval()
    fmt = FORMATS["deepseek-llm"]
    llm = llama(cfg.run_dir / "model-q8_0.gguf")
    right = 0
    for q, a in FACTS:
        want = greedy_answer(model, tok, fmt, [Message("user", q)], 24)
        ids = tok(fmt.render_prompt([Message("user", q)]), add_special_tokens=False)["input_ids"]
        out = llm.create_completion(ids, max_tokens=24, temperature=0.0, top_k=1)["choices"][0]["text"]
        assert out.strip() == want.strip(), q
        right += want.strip() == a
    assert right >= 3, right
    # eval through the GGUF works for it too (its base GGUF is written without an adapter.gguf,
    # which a LoRA on the MLA projections cannot be)
    from ollama_ft.evaluation import eval_stage

    ev = eval_stage(cfg.run_dir, eval_data=str(data), max_new_tokens=24, log=lambda *a: None,
                    progress=False)
    assert ev["fine_tuned"]["loss"] < ev["base"]["loss"] and ev["fine_tuned"]["exact_match"] >= 0.75
    assert not (cfg.run_dir / "adapter.gguf").exists() and (cfg.run_dir / "base-q8_0.gguf").is_file()


# --- V3 / R1 (DeepseekV3ForCausalLM): the export a multi-GPU user of R1 needs --------------
def test_v3_lora_exports_and_matches_pytorch(tiny_base, tmp_path):
    """q compression (q_a/q_b), sigmoid routing with the score bias, group-limited experts:
    F16 logits of base + LoRA as PyTorch's, and llama.cpp's metadata for them."""
    from transformers import AutoTokenizer

    from ollama_ft.export import export_stage

    base = tiny_base("r1-v3")
    run = make_run(base, tmp_path / "run", "deepseek-r1", targets=LINEAR_TARGETS["deepseek3"])
    result = export_stage(run, quants="f16", log=lambda *a: None)
    assert result.pre_tokenizer == "deepseek-v3"
    tok = AutoTokenizer.from_pretrained(base)
    ids = tok(FORMATS["deepseek-r1"].render_prompt(CONVERSATION), add_special_tokens=False)["input_ids"]
    ref = torch_logits(base, run / "adapter", ids)
    got = gguf_logits(run / "model-f16.gguf", ids)
    assert np.abs(got - ref).max() <= F16_TOL
    assert (got.argmax(-1) == ref.argmax(-1))[top2_margin(ref) >= F16_TOL].all()
    assert np.abs(torch_logits(base, None, ids) - ref).max() > 10 * F16_TOL
    meta = read_gguf(run / "model-f16.gguf")
    t = meta["__tensors__"]
    assert meta["general.architecture"] == "deepseek2"
    assert meta["deepseek2.expert_gating_func"] == 2  # sigmoid
    assert meta["deepseek2.expert_weights_norm"] is True
    assert meta["deepseek2.expert_weights_scale"] == pytest.approx(2.5)
    assert meta["deepseek2.expert_group_count"] == 2 and meta["deepseek2.expert_group_used_count"] == 1
    assert meta["deepseek2.attention.q_lora_rank"] == 48
    assert "blk.1.exp_probs_b.bias" in t and t["blk.1.exp_probs_b.bias"][0] == "F32"
    assert "blk.0.attn_q_a.weight" in t and "blk.0.attn_q_b.weight" in t and "blk.0.attn_q_a_norm.weight" in t
