"""Export building blocks, no model needed: types, tables, transforms, templates, readers."""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path

import numpy as np
import pytest

from ollama_ft.chat_formats import FORMATS, Message
from ollama_ft.errors import QuantTypeError
from ollama_ft.export.errors import CheckpointError, TokenizerError


# --- --quant ------------------------------------------------------------------------------
def test_parse_quants_normalises_and_dedupes():
    from ollama_ft.quants import parse_quants

    assert [q.name for q in parse_quants("Q4_K_M, q8_0,f16,q4_k_m")] == ["q4_k_m", "q8_0", "f16"]
    assert [q.name for q in parse_quants(None)] == ["q4_k_m"]
    assert [(q.name, q.direct) for q in parse_quants(["bf16", "q6_k"])] == [("bf16", True),
                                                                           ("q6_k", False)]


def test_unknown_quant_lists_valid_types():
    from ollama_ft.quants import parse_quants

    with pytest.raises(QuantTypeError) as e:
        parse_quants("q4_k_m,q4_k_xl")
    msg = str(e.value)
    assert "'q4_k_xl'" in msg and "q4_k_m" in msg and "q8_0" in msg and "f16" in msg


def test_quant_types_map_to_llama_cpp_file_types():
    import gguf

    from ollama_ft.export.gguf import DIRECT_TYPES
    from ollama_ft.quants import QUANT_TYPES, parse_quants

    # every type --quant accepts has a llama_ftype, the one gguf.py and llama.cpp both use
    for q in parse_quants(list(QUANT_TYPES)):
        assert q.file_type == int(gguf.LlamaFileType[q.file_type_name]), q.name
    assert {k: q.file_type for k, q in DIRECT_TYPES.items()} == {"F32": 0, "F16": 1, "BF16": 32,
                                                                 "Q8_0": 7}
    assert QUANT_TYPES["q4_k_m"].file_type == 15 and QUANT_TYPES["q6_k"].file_type == 18


def test_architecture_tables_agree():
    """catalog.ARCHITECTURES is the one table of HF class -> short name -> GGUF architecture;
    every table keyed by the short name covers it, and every catalogue base uses it."""
    import gguf

    from ollama_ft import catalog
    from ollama_ft.export.gguf import EXPORT_SPECS, arch_spec
    from ollama_ft.train.lora import LINEAR_TARGETS

    shorts = {short for short, _ in catalog.ARCHITECTURES.values()}
    assert set(EXPORT_SPECS) == shorts  # each trainable architecture exports; no orphan spec
    assert shorts <= set(LINEAR_TARGETS)
    assert not set(catalog.PLANNED_ARCHITECTURES) & set(catalog.ARCHITECTURES)
    planned = set(catalog.PLANNED_ARCHITECTURES.values())
    for m in catalog.CATALOG:
        assert m.architecture in (shorts if m.supported else planned), m.alias
    for hf_class, (short, gguf_arch) in catalog.ARCHITECTURES.items():
        spec = arch_spec({"architectures": [hf_class]}, "config.json")
        assert (spec.name, spec.gguf_arch) == (short, gguf_arch)
        assert gguf_arch in gguf.MODEL_ARCH_NAMES.values() and spec.model_arch() is not None


def test_export_refuses_an_architecture_outside_the_catalogue():
    from ollama_ft.export.errors import UnsupportedModelError
    from ollama_ft.export.gguf import arch_spec

    with pytest.raises(UnsupportedModelError, match="MixtralForCausalLM has no GGUF table; "
                       "export supports .*DeepseekV3ForCausalLM"):
        arch_spec({"architectures": ["MixtralForCausalLM"]}, "config.json")


# --- tables and transforms ----------------------------------------------------------------
def test_rotary_permutation_matches_llama_cpp_layout():
    from ollama_ft.export.gguf import rotary_permutation

    rows, heads, cols = 24, 3, 5
    w = np.arange(rows * cols, dtype=np.float32).reshape(rows, cols)
    # llama.cpp's reference layout: (heads, 2, half, cols) with the middle axes swapped
    want = w.reshape(heads, 2, rows // heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)
    np.testing.assert_array_equal(w[rotary_permutation(rows, heads)], want)


def test_llama3_rope_factors_match_transformers():
    import torch
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from ollama_ft.export.gguf import llama3_rope_factors

    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64, "rope_theta": 500000.0}
    cfg = LlamaConfig(hidden_size=256, num_attention_heads=4, rope_parameters=rope,
                      max_position_embeddings=1024)
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, torch.device("cpu"))
    config = {"hidden_size": 256, "num_attention_heads": 4, "rope_theta": 500000.0,
              "rope_scaling": {k: v for k, v in rope.items() if k != "rope_theta"}}
    factors = llama3_rope_factors(config)
    plain = 1.0 / (500000.0 ** (np.arange(0, 64, 2) / 64))
    np.testing.assert_allclose(plain / factors, inv_freq.numpy(), rtol=1e-5)
    assert factors.min() == 1.0 and factors.max() == 8.0  # both ends are exercised


def test_hparams_carry_linear_rope_scaling_and_head_dim():
    from ollama_ft.export.gguf import arch_spec, hparams

    config = {"architectures": ["LlamaForCausalLM"], "max_position_embeddings": 16384,
              "hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
              "rope_theta": 100000, "rope_scaling": {"type": "linear", "factor": 4.0},
              "vocab_size": 32256}
    got = {k: v for k, v, _ in hparams(arch_spec(config, "x"), config, "x")}
    assert got["llama.rope.scaling.type"] == "linear"
    assert got["llama.rope.scaling.factor"] == 4.0
    assert got["llama.context_length"] == 16384 and got["llama.rope.freq_base"] == 100000.0
    assert got["llama.rope.dimension_count"] == 16 and got["llama.attention.head_count_kv"] == 2
    # transformers 5 spelling of the same thing
    config5 = {**config, "rope_parameters": {"rope_type": "linear", "factor": 4.0,
                                             "rope_theta": 100000.0}}
    del config5["rope_scaling"], config5["rope_theta"]
    assert {k: v for k, v, _ in hparams(arch_spec(config5, "x"), config5, "x")} == got


def test_unsupported_rope_scaling_is_refused():
    from ollama_ft.export.errors import UnsupportedModelError
    from ollama_ft.export.gguf import arch_spec, hparams

    config = {"architectures": ["Qwen2ForCausalLM"], "max_position_embeddings": 4096,
              "hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 2,
              "num_attention_heads": 4, "rms_norm_eps": 1e-6, "vocab_size": 100,
              "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}
    with pytest.raises(UnsupportedModelError, match="rope scaling 'dynamic'"):
        hparams(arch_spec(config, "cfg"), config, "cfg")


# --- tokenizers ---------------------------------------------------------------------------
def _tokenizer_json(name: str) -> dict:
    from ollama_ft.tinymodel import tokenizer_source

    with zipfile.ZipFile(tokenizer_source(name) / "tokenizer.json.zip") as z:
        return json.loads(z.read("tokenizer.json"))


@pytest.mark.parametrize("name,pre", [
    ("deepseek-r1-distill-qwen-7b", "qwen2"),
    ("deepseek-r1-0528-qwen3-8b", "qwen2"),
    ("deepseek-r1-distill-llama-8b", "llama-bpe"),
    ("deepseek-coder-33b-base", "deepseek-coder"),
    ("deepseek-llm-7b-base", "deepseek-llm"),
    ("deepseek-coder-7b-base-v1.5", "deepseek-llm"),
    ("deepseek-v2", "deepseek-llm"),
    ("deepseek-v3", "deepseek-v3"),
    ("deepseek-r1", "deepseek-v3"),
])
def test_pre_tokenizer_identified_from_split_regexes(name, pre):
    from ollama_ft.export.vocab import identify_pre_tokenizer

    assert identify_pre_tokenizer(_tokenizer_json(name), name).name == pre


def test_pre_tokenizer_names_are_known_to_llama_cpp():
    """Every name we write is one llama.cpp's libllama accepts (strings in the library)."""
    import llama_cpp

    from ollama_ft.export.vocab import PRE_TOKENIZERS

    lib = (Path(llama_cpp.__file__).parent / "lib")
    blob = b"".join(p.read_bytes() for p in lib.glob("libllama.so*") if p.is_file())
    for entry in PRE_TOKENIZERS:
        assert entry.name.encode() + b"\0" in blob, entry.name


def test_unknown_pre_tokenizer_is_a_clear_error():
    from ollama_ft.export.vocab import identify_pre_tokenizer

    tj = _tokenizer_json("deepseek-r1-distill-qwen-7b")
    split = tj["pre_tokenizer"]["pretokenizers"][0]
    split["pattern"]["Regex"] = split["pattern"]["Regex"].replace(r"\p{N}", r"\p{N}{1,2}")
    with pytest.raises(TokenizerError) as e:
        identify_pre_tokenizer(tj, "base/tokenizer.json")
    msg = str(e.value)
    assert "base/tokenizer.json" in msg and "not recognised" in msg and "qwen2" in msg
    assert r"\p{N}{1,2}" in msg  # says what it found


def test_non_byte_level_tokenizer_is_refused(tmp_path):
    from ollama_ft.export.vocab import read_tokenizer

    tj = _tokenizer_json("deepseek-r1-distill-qwen-7b")
    tj["model"]["byte_fallback"] = True
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(TokenizerError, match="byte-level BPE"):
        read_tokenizer(tmp_path, 151680, FORMATS["deepseek-r1"])


CONVERSATIONS = [
    [Message("user", "Hi")],
    [Message("system", "Be brief."), Message("user", "2+2?")],
    [Message("system", "A"), Message("system", "B"), Message("user", "q1"),
     Message("assistant", "a1"), Message("user", "q2 中文 🚀\n\tcode")],
    [Message("user", "q1"), Message("assistant", "a1"), Message("user", "q2"),
     Message("assistant", "a2"), Message("user", "q3")],
    [Message("system", ""), Message("user", "empty system")],
]


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_chat_templates_render_like_the_chat_format(fmt):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from ollama_ft.export.vocab import CHAT_TEMPLATES

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    template = env.from_string(CHAT_TEMPLATES[fmt])
    for conv in CONVERSATIONS:
        msgs = [{"role": m.role, "content": m.content} for m in conv]
        got = template.render(messages=msgs, add_generation_prompt=True)
        assert got == FORMATS[fmt].render_prompt(conv), (fmt, conv)


def test_every_format_writes_bos_so_llama_cpp_must_not_add_one():
    from ollama_ft.export.vocab import add_bos_for

    for fmt in FORMATS.values():
        assert add_bos_for(fmt, "<｜begin▁of▁sentence｜>") is False
    assert add_bos_for(FORMATS["deepseek-r1"], "<s>") is True


# --- safetensors reading and merging ------------------------------------------------------
def _write_st(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    from safetensors.numpy import save_file

    save_file(tensors, str(path))
    return path


def test_safetensors_reader_reads_bf16_f16_f32(tmp_path):
    import torch
    from safetensors.torch import save_file

    from ollama_ft.export.merge import SafetensorsFile, to_f32

    t = {"a": torch.randn(5, 7).to(torch.bfloat16), "b": torch.randn(3).half(),
         "c": torch.randn(2, 2)}
    save_file(t, str(tmp_path / "m.safetensors"))
    sf = SafetensorsFile(tmp_path / "m.safetensors")
    for k, v in t.items():
        got = to_f32(sf.raw(k), sf.tensors[k].dtype)
        np.testing.assert_array_equal(got, v.float().numpy())
    sf.release("a", 0, 2)
    sf.close()


def test_bf16_rounding_matches_torch():
    import torch

    from ollama_ft.export.merge import f32_to_bf16_bits

    x = torch.randn(10000) * 10
    want = x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(f32_to_bf16_bits(x.numpy()), want)


@pytest.mark.parametrize("damage,needle", [
    (lambda b: b[: len(b) - 100], "truncated"),
    (lambda b: (2**40).to_bytes(8, "little") + b[8:], "header length"),
    (lambda b: b[:8] + b"\x00" * 20 + b[28:], "not valid JSON"),
    (lambda b: b"", "shorter than a safetensors header"),
])
def test_corrupt_safetensors_are_named(tmp_path, damage, needle):
    from ollama_ft.export.merge import SafetensorsFile

    path = _write_st(tmp_path / "model.safetensors", {"w": np.ones((16, 16), np.float32)})
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CheckpointError) as e:
        SafetensorsFile(path)
    assert str(path) in str(e.value) and needle in str(e.value)


def test_index_naming_a_missing_shard(tmp_path):
    from ollama_ft.export.merge import Checkpoint

    _write_st(tmp_path / "model-00001-of-00002.safetensors", {"a": np.ones(4, np.float32)})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors.*incomplete"):
        Checkpoint(tmp_path)


@pytest.mark.parametrize("kind", ["lora", "rslora", "dora", "patterns"])
def test_merge_matches_peft_merge_and_unload(tmp_path, kind):
    """Our block-wise fp32 merge equals PEFT's own merge, for plain, rsLoRA, DoRA, patterns."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file

    from ollama_ft.export.merge import Checkpoint, MergedModel, load_adapter

    torch.manual_seed(0)
    net = torch.nn.Sequential()
    net.add_module("up", torch.nn.Linear(48, 96, bias=False))
    net.add_module("down", torch.nn.Linear(96, 48, bias=False))
    base = {k: v.clone() for k, v in net.state_dict().items()}
    save_file({f"{k}": v.contiguous() for k, v in base.items()}, str(tmp_path / "model.safetensors"))
    extra = {"use_rslora": kind == "rslora", "use_dora": kind == "dora"}
    if kind == "patterns":
        extra.update(rank_pattern={"down": 2}, alpha_pattern={"down": 7})
    peft = get_peft_model(net, LoraConfig(r=4, lora_alpha=12, target_modules=["up", "down"],
                                          **extra))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn_like(p) * 0.1)
    peft.save_pretrained(tmp_path / "adapter")
    want = {k: v.detach().numpy() for k, v in peft.merge_and_unload().state_dict().items()}
    model = MergedModel(Checkpoint(tmp_path), load_adapter(tmp_path / "adapter"))
    for name in ("up.weight", "down.weight"):
        rows = model.ckpt.info(name).shape[0]
        got = np.concatenate([model.rows(name, s, min(s + 7, rows)) for s in range(0, rows, 7)])
        np.testing.assert_allclose(got, want[name], rtol=1e-5, atol=1e-6)
        assert not np.allclose(got, base[name].numpy())  # the delta is there


def test_estimates_cover_real_sizes():
    from ollama_ft.export.quantize import estimate_bytes
    from ollama_ft.quants import QUANT_TYPES

    # a 7B-shaped model: F16 is 2 bytes a weight, Q4_K_M under 5.1 bits
    n = 7_000_000_000
    assert estimate_bytes(QUANT_TYPES["f16"], n, 0) >= n * 2
    assert estimate_bytes(QUANT_TYPES["q4_k_m"], n, 0) >= n * 4.9 / 8
    assert math.isclose(estimate_bytes(QUANT_TYPES["q8_0"], n, 0) / n, 8.5 / 8, rel_tol=0.01)
