"""llama.cpp's quantization, a block of rows at a time (export/quantize.py): the very bytes
`llama_model_quantize` writes for the whole file, without ever holding a whole tensor."""

import hashlib
import json
import os

import pytest


@pytest.fixture(scope="module")
def f16_gguf(tiny_base, tmp_path_factory):
    """make(hidden) -> an F16 GGUF of a tiny R1-Distill-Qwen-shaped model."""
    from ollama_ft.chat_formats import FORMATS
    from ollama_ft.export.gguf import GeneralMetadata, write_gguf
    from ollama_ft.export.merge import Checkpoint, MergedModel
    from ollama_ft.export.vocab import read_tokenizer

    root = tmp_path_factory.mktemp("f16")
    made = {}

    def make(hidden: int):
        if hidden not in made:
            base = tiny_base("r1-qwen", hidden=hidden, layers=3)
            cfg = json.loads((base / "config.json").read_text())
            ck = Checkpoint(base)
            tok = read_tokenizer(base, cfg["vocab_size"], FORMATS["deepseek-r1"])
            out = root / f"f16-{hidden}.gguf"
            write_gguf(out, MergedModel(ck), cfg, "F16", tok, GeneralMetadata(name="t"),
                       str(base), log=lambda *a: None)
            ck.close()
            made[hidden] = out
        return made[hidden]

    return make


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


# hidden 256: K-quant rows (Q4_K_M's mixture: Q4_K, Q6_K for the output and half the attn_v /
# ffn_down layers); hidden 64: rows too short for K-quants, llama.cpp's fallback types
@pytest.mark.parametrize("hidden,quant", [(256, "q4_k_m"), (64, "q4_k_m"), (64, "q4_0")])
def test_same_bytes_as_llama_cpp_on_the_whole_file(f16_gguf, tmp_path, monkeypatch, hidden, quant):
    from ollama_ft.export import quantize
    from ollama_ft.export.quantize import llama_quantize, read_layout
    from ollama_ft.quants import QUANT_TYPES

    src = f16_gguf(hidden)
    whole, blocks = tmp_path / "whole.gguf", tmp_path / "blocks.gguf"
    quantize._quantize_whole(src, whole, QUANT_TYPES[quant], 2)
    # small blocks: every tensor is cut into many, reads are bounded by the block size
    monkeypatch.setattr(quantize, "ROW_BLOCK_ELEMENTS", 64 * 1024)
    monkeypatch.setattr(quantize, "COPY_BYTES", 256 * 1024)
    reads = []
    real_pread = os.pread

    def pread(fd, n, pos):
        reads.append(n)
        return real_pread(fd, n, pos)

    monkeypatch.setattr(os, "pread", pread)
    llama_quantize(src, blocks, QUANT_TYPES[quant], 2)
    assert _digest(blocks) == _digest(whole)
    biggest = max(t.rows * t.shape[0] * 2 for t in read_layout(src).tensors)
    assert max(reads) <= 256 * 1024 < biggest // 8  # no tensor was read whole
    types = {t.type for t in read_layout(blocks).tensors}
    assert len(types) >= 2  # a mixture (or fallbacks), not one type everywhere


def test_non_finite_merged_weights_are_named(f16_gguf, tmp_path):
    from ollama_ft.export.errors import QuantizeError
    from ollama_ft.export.quantize import llama_quantize, read_layout
    from ollama_ft.quants import QUANT_TYPES

    src = f16_gguf(64)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(src.read_bytes())
    layout = read_layout(bad)
    t = next(t for t in layout.tensors if t.name == "blk.1.ffn_up.weight")
    with open(bad, "r+b") as f:
        f.seek(layout.data_start + t.offset + 2 * t.shape[0] * 3)  # row 3
        f.write(b"\x00\x7e" * 8)  # F16 NaN
    with pytest.raises(QuantizeError, match="blk.1.ffn_up.weight"):
        llama_quantize(bad, tmp_path / "out.gguf", QUANT_TYPES["q4_k_m"], 2)
