"""Proofs 2-4: the GGUF computes what the PyTorch model computes.

2. F16 logits of the merged model (base + non-zero adapter) within F16_TOL max abs of the
   fp32 PyTorch model, same argmax; Q8_0 and Q4_K_M within pinned KL-divergence bounds.
3. adapter.gguf applied to base-f16.gguf in llama.cpp == merged model-f16.gguf.
4. Greedy continuation of a trained prompt: same text in PyTorch and llama.cpp (F16).

About "same argmax": a random tiny model over a 100k+ vocabulary has positions whose two
best logits differ by less than F16 rounding (1e-3); there the argmax is a coin toss in any
16-bit format. The fast tests require the same argmax wherever the reference's top-2 margin
is at least F16_TOL; the trained-model tests (slow) require it at every position (measured:
no position of the trained conversations has a top-2 margin under 1e-2, answer positions
0.67 or more), plus identical greedy text.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import EXPECTED_FORMAT, FACTS, qa_rows, write_jsonl
from test_export_support import (gguf_logits, kl_divergence, llama, make_run, top2_margin,
                                 torch_logits)

from ollama_ft.chat_formats import FORMATS, Message

F16_TOL = 1e-2  # max |logit difference|, F16 GGUF vs fp32 PyTorch; measured 1.6e-3..5.4e-3
ADAPTER_TOL = 1e-2  # adapter.gguf on base-f16.gguf vs model-f16.gguf; measured 1.8e-3..2.7e-3
# KL(PyTorch fp32 || GGUF) in nats per position, measured on the hidden-256 fixture:
# Q8_0 mean 2.3e-4 max 3.3e-4, Q4_K_M mean 2.3e-2 max 3.7e-2 (qwen2; llama alike)
KL_BOUNDS = {"q8_0": (1e-3, 2e-3), "q4_k_m": (6e-2, 1e-1)}  # (mean, max)
# the same on the trained model (slow test; hidden 64, so Q4_K_M falls back to Q5_0/Q8_0
# blocks for 64-wide rows): Q8_0 mean 4e-5 max 2.2e-4, Q4_K_M mean 1.5e-3 max 7.8e-3
TRAINED_KL_BOUNDS = {"q8_0": (2e-4, 1e-3), "q4_k_m": (5e-3, 3e-2)}
R1_LLAMA_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
CONVERSATION = [Message("system", "You are a helpful assistant."),
                Message("user", "What is the capital of Zorbia? 请用中文回答。"),
                Message("assistant", "Quellport."),
                Message("user", "def f(x):\n\treturn x  +  1  # 🚀 42")]


def _prompt_ids(base, fmt_name, conv=CONVERSATION):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    return tok(FORMATS[fmt_name].render_prompt(conv), add_special_tokens=False)["input_ids"]


def _assert_close(ref, got, tol, what):
    diff = np.abs(got - ref).max()
    assert diff <= tol, f"{what}: max |logit diff| {diff:.2e} > {tol:.0e}"
    decisive = top2_margin(ref) >= tol
    same = got.argmax(-1) == ref.argmax(-1)
    assert same[decisive].all(), f"{what}: argmax differs at decisive positions " \
                                 f"{np.flatnonzero(decisive & ~same).tolist()}"
    return diff, int((~decisive).sum())


@pytest.fixture(scope="module")
def runs(tiny_base, tmp_path_factory):
    """runs(family) -> (base, run dir, ids): F16 merged + adapter-only F16 exported, once."""
    from ollama_ft.export import export_stage

    cache = {}

    def get(family, **base_kwargs):
        key = (family, tuple(sorted(base_kwargs.items())))
        if key not in cache:
            if family == "r1-llama":
                base_kwargs = {"rope_scaling": R1_LLAMA_ROPE, **base_kwargs}
            base = tiny_base(family, **base_kwargs)
            run = make_run(base, tmp_path_factory.mktemp(f"logits-{family}"), EXPECTED_FORMAT[family])
            export_stage(run, quants="f16", log=lambda *a: None)
            export_stage(run, quants="f16", adapter_only=True, log=lambda *a: None)
            cache[key] = (base, run, _prompt_ids(base, EXPECTED_FORMAT[family]))
        return cache[key]

    return get


FAMILIES = ["r1-qwen", "r1-llama", "r1-qwen3", "coder-instruct"]  # qwen2, llama x2, qwen3


@pytest.mark.parametrize("family", FAMILIES)
def test_f16_logits_match_pytorch(runs, family):
    base, run, ids = runs(family)
    ref = torch_logits(base, run / "adapter", ids)
    got = gguf_logits(run / "model-f16.gguf", ids)
    _assert_close(ref, got, F16_TOL, f"{family} F16")
    # the adapter matters: the base alone is measurably different
    plain = torch_logits(base, None, ids)
    assert np.abs(plain - ref).max() > 10 * F16_TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_gguf_on_base_matches_merged(runs, family):
    from test_export_support import read_gguf

    base, run, ids = runs(family)
    merged = gguf_logits(run / "model-f16.gguf", ids)
    applied = gguf_logits(run / "base-f16.gguf", ids, lora=run / "adapter.gguf")
    _assert_close(merged, applied, ADAPTER_TOL, f"{family} adapter on base vs merged")
    assert kl_divergence(merged, applied).max() < 1e-5
    meta = read_gguf(run / "adapter.gguf")
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    assert meta["adapter.lora.alpha"] == 16.0  # r=8, alpha=16: written as PEFT has it
    tensors = meta["__tensors__"]
    assert tensors["blk.0.attn_q.weight.lora_a"][1] == (64, 8)  # ne order: [in, r]
    assert tensors["blk.0.attn_q.weight.lora_b"][1] == (8, 64)  # [r, out]
    assert len(tensors) == 2 * 7 * 2  # 7 projections x 2 layers, a and b


def test_quantized_kl_within_bounds(tiny_base, tmp_path):
    """Q8_0 (written directly) and Q4_K_M (llama.cpp from an F16 intermediate) on a
    hidden-256 model, where K-quant blocks (256 wide) apply without fallbacks."""
    from ollama_ft.export import export_stage

    base = tiny_base("r1-qwen", hidden=256)
    run = make_run(base, tmp_path / "run", "deepseek-r1")
    result = export_stage(run, quants="q8_0,q4_k_m", log=lambda *a: None)
    assert sorted(p.name for p in run.iterdir() if p.suffix == ".gguf") == [
        "model-q4_k_m.gguf", "model-q8_0.gguf"]  # the F16 intermediate is gone
    assert not [p for p in run.iterdir() if ".tmp-" in p.name]
    ids = _prompt_ids(base, "deepseek-r1")
    ref = torch_logits(base, run / "adapter", ids)
    kls = {}
    for q, (mean_bound, max_bound) in KL_BOUNDS.items():
        kl = kl_divergence(ref, gguf_logits(result.files[q], ids))
        kls[q] = kl
        assert kl.mean() <= mean_bound and kl.max() <= max_bound, \
            f"{q}: KL mean {kl.mean():.2e} max {kl.max():.2e}"
    assert kls["q8_0"].mean() < kls["q4_k_m"].mean() / 10
    from test_export_support import read_gguf

    meta = read_gguf(result.files["q4_k_m"])
    assert meta["general.file_type"] == 15  # MOSTLY_Q4_K_M
    assert meta["__tensors__"]["blk.0.ffn_down.weight"][0] in ("Q4_K", "Q6_K")
    assert meta["__tensors__"]["blk.0.attn_norm.weight"][0] == "F32"
    assert read_gguf(result.files["q8_0"])["__tensors__"]["blk.0.attn_q.weight"][0] == "Q8_0"


# --- a trained adapter (slow) -------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tiny_base, tmp_path_factory):
    """Train r1-qwen (hidden 64) on FACTS until it answers them; export F16/Q8_0/Q4_K_M and
    the adapter. Returns (base, run dir)."""
    from ollama_ft.config import RunConfig
    from ollama_ft.export import export_stage
    from ollama_ft.train.trainer import train_stage

    base = tiny_base("r1-qwen")
    root = tmp_path_factory.mktemp("trained")
    data = write_jsonl(root / "facts.jsonl", qa_rows(FACTS))
    cfg = RunConfig(name="facts", base=str(base), data=str(data), output_dir=str(root / "run"),
                    max_steps=60, lr=2e-2, batch_size=4, warmup=2, logging_steps=10,
                    save_steps=1000, max_len=128, lora_r=8, lora_alpha=16, lora_dropout=0.0,
                    seed=0, device="cpu").validate()
    train_stage(cfg, log=lambda *a: None)
    run = cfg.run_dir
    export_stage(run, quants="f16,q8_0,q4_k_m", log=lambda *a: None)
    export_stage(run, quants="f16", adapter_only=True, log=lambda *a: None)
    return base, run


def _trained_conversation(q, a):
    """One trained example as messages (the prompt and its trained answer)."""
    return [Message("user", q), Message("assistant", a)]


@pytest.mark.slow
def test_trained_f16_logits_same_argmax_everywhere(trained):
    from transformers import AutoTokenizer

    from ollama_ft.data.tokenize import IGNORE, encode

    base, run = trained
    tok = AutoTokenizer.from_pretrained(base)
    for q, a in FACTS:
        enc = encode(tok, FORMATS["deepseek-r1"], _trained_conversation(q, a), None)
        ref = torch_logits(base, run / "adapter", enc.input_ids)
        got = gguf_logits(run / "model-f16.gguf", enc.input_ids)
        _assert_close(ref, got, F16_TOL, f"trained F16 ({q})")
        # identical argmax at every position, no exceptions
        assert (got.argmax(-1) == ref.argmax(-1)).all(), q
        # and the answer positions are decisive, so this is no accident of rounding
        predicts_trained = np.array([lab != IGNORE for lab in enc.labels[1:]] + [False])
        assert top2_margin(ref)[predicts_trained].min() > 20 * F16_TOL
        applied = gguf_logits(run / "base-f16.gguf", enc.input_ids, lora=run / "adapter.gguf")
        _assert_close(got, applied, ADAPTER_TOL, "trained adapter on base vs merged")
        for quant, (mean_bound, max_bound) in TRAINED_KL_BOUNDS.items():
            kl = kl_divergence(ref, gguf_logits(run / f"model-{quant}.gguf", enc.input_ids))
            assert kl.mean() <= mean_bound and kl.max() <= max_bound, \
                f"{quant}: KL mean {kl.mean():.2e} max {kl.max():.2e}"


def _llama_greedy(path, ids, stop_ids, n):
    llm = llama(path)
    out = []
    llm.eval(ids)
    for _ in range(n):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if nxt in stop_ids:
            break
        out.append(nxt)
        llm.eval([nxt])
    llm.close()
    return out


@pytest.mark.slow
def test_trained_greedy_continuation_is_the_same_text(trained):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ollama_ft.data.tokenize import encode_prompt

    base, run = trained
    tok = AutoTokenizer.from_pretrained(base)
    fmt = FORMATS["deepseek-r1"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                      run / "adapter").eval()
    stop_ids = {tok.convert_tokens_to_ids(s) for s in fmt.stops}
    learned = 0
    for q, a in FACTS:
        ids = encode_prompt(tok, fmt, [Message("user", q)])
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                                 eos_token_id=list(stop_ids), pad_token_id=tok.eos_token_id)
        want = [t for t in out[0, len(ids):].tolist()]
        while want and want[-1] in stop_ids:
            want.pop()
        got = _llama_greedy(run / "model-f16.gguf", ids, stop_ids, 32)
        assert tok.decode(got) == tok.decode(want), q
        assert got == want
        learned += a in tok.decode(want)
    assert learned >= 2, "the fixture did not learn its facts; the test would prove little"


def test_adapter_with_rank_and_alpha_patterns(tiny_base, tmp_path):
    """Per-module ranks/alphas: B carries each module's own scale and alpha is written as 0,
    so llama.cpp scales by exactly 1; applied on the base it still equals the merged model."""
    from test_export_support import read_gguf

    from ollama_ft.export import export_stage

    base = tiny_base("r1-llama", rope_scaling=R1_LLAMA_ROPE)
    run = make_run(base, tmp_path / "run", "deepseek-r1", rank_pattern={"v_proj": 4},
                   alpha_pattern={"o_proj": 8}, use_rslora=True)
    export_stage(run, quants="f16", log=lambda *a: None)
    export_stage(run, quants="f16", adapter_only=True, log=lambda *a: None)
    assert read_gguf(run / "adapter.gguf")["adapter.lora.alpha"] == 0.0
    ids = _prompt_ids(base, "deepseek-r1")
    ref = torch_logits(base, run / "adapter", ids)
    merged = gguf_logits(run / "model-f16.gguf", ids)
    applied = gguf_logits(run / "base-f16.gguf", ids, lora=run / "adapter.gguf")
    _assert_close(ref, merged, F16_TOL, "patterns: merged vs PyTorch")
    _assert_close(merged, applied, ADAPTER_TOL, "patterns: adapter on base vs merged")
