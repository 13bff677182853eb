"""A GGUF (an Ollama model blob) -> a Hugging Face checkpoint folder training can start from.

    out/config.json               from the GGUF metadata (LlamaForCausalLM / Qwen2ForCausalLM /
                                  Qwen3ForCausalLM), via transformers' own config classes
    out/tokenizer.json            built from tokenizer.ggml.* with the `tokenizers` library, so it
    out/tokenizer_config.json     splits text as llama.cpp does (_pre_tokenizer_table) and keeps
                                  every control / user-defined token whole; chat template, BOS/EOS
    out/model.safetensors         every tensor, GGUF -> HF names, quantized ones dequantized to F32
    out/gguf-source.json          where it came from (file, architecture, tensor types)

Streaming: the safetensors header is planned from the GGUF tensor infos alone, then each tensor
is read from a memory map in row blocks, dequantized with gguf-py, un-permuted where llama.cpp
permuted it, and appended; pages already read are handed back to the kernel. Peak memory is a
few blocks, not the model. Everything is written into a temporary folder beside the target and
renamed when whole.

The facts come from the tables export already has, read backwards: tensor names from gguf-py's
name map (HF -> GGUF, as export/gguf.py uses it), hyperparameters from export/gguf.py's
`_common_hparams`, llama's rotary row order from its `EXPORT_SPECS` (the inverse permutation is
applied), pre-tokenizer split rules from export/vocab.py's `PRE_TOKENIZERS`.

Why the tokenizer is not transformers' GGUF tokenizer (`AutoTokenizer.from_pretrained(d,
gguf_file=...)`, transformers 5.23): it byte-encodes every token that has characters outside the
byte-level alphabet and then drops those from the special tokens, so DeepSeek's `<｜User｜>`
splits into five pieces and `<｜end▁of▁sentence｜>` comes back as a new id past the
vocabulary; and it knows no `smollm`, `deepseek-coder`, `deepseek-llm` or `deepseek-v3` split
rules.
"""

from __future__ import annotations

import errno
import json
import math
import mmap
import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from ollama_ft import catalog
from ollama_ft.errors import BaseModelError
from ollama_ft.export.merge import _header_bytes, row_blocks

# Bump when the output of the conversion changes: cached checkpoints of older versions are rebuilt.
FORMAT_VERSION = 1
SOURCE_FILE = "gguf-source.json"
WEIGHTS_FILE = "model.safetensors"
# GGUF architectures converted here (the short names of catalog.ARCHITECTURES, which are also
# the transformers model_type of these three)
SUPPORTED = ("llama", "qwen2", "qwen3")
BLOCK_ELEMENTS = 1 << 20  # rows per block: about 4 MB of fp32 (dequantizing takes a few times that)
PAGE = mmap.PAGESIZE
Q = gguf.GGMLQuantizationType
# GGUF types written as they are (safetensors dtype, numpy dtype of the stored bits)
KEPT_TYPES = {Q.F32: ("F32", np.float32), Q.F16: ("F16", np.float16),
              Q.BF16: ("BF16", np.uint16), Q.F64: ("F64", np.float64)}
SCALE_LINEAR = "{arch}.rope.scale_linear"  # older files' linear rope factor (llama.cpp reads it)
TORCH_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


# --- reading the GGUF ---------------------------------------------------------------------
@dataclass
class GGUFTensor:
    name: str  # GGUF name
    qtype: object  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order (reversed ne): rows first
    offset: int  # absolute offset of the data in the file
    nbytes: int

    @property
    def out_dtype(self) -> str:
        return KEPT_TYPES[self.qtype][0] if self.qtype in KEPT_TYPES else "F32"

    @property
    def out_nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(
            KEPT_TYPES[self.qtype][1] if self.qtype in KEPT_TYPES else np.float32).itemsize


@dataclass
class GGUFModel:
    path: Path
    meta: dict  # key -> value (strings, numbers, lists)
    tensors: dict[str, GGUFTensor]  # in file order

    @property
    def arch(self) -> str:
        return str(self.meta.get("general.architecture", "?"))

    def key(self, template: str):
        """The value of an `{arch}.`-templated key (gguf.Keys), None when absent."""
        return self.meta.get(template.format(arch=self.arch))


def _not_gguf(path: Path, why: str) -> BaseModelError:
    return BaseModelError(f"{path}: not a usable GGUF model file ({why}); point --base ollama:NAME "
                          "at a model the daemon runs, or pull it again (`ollama pull NAME`)")


def read_gguf(path: str | Path) -> GGUFModel:
    """Metadata and tensor infos of a GGUF (tensor data stays on disk)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
        size = path.stat().st_size
    except IsADirectoryError:
        raise _not_gguf(path, "it is a folder") from None
    except OSError as e:
        raise BaseModelError(f"{path}: cannot be read ({e.strerror or e})") from None
    if magic != b"GGUF":
        raise _not_gguf(path, f"it does not start with the GGUF magic but {magic!r}")
    try:
        reader = gguf.GGUFReader(path)
        meta = {}
        for key, field in reader.fields.items():
            if key.startswith("GGUF."):
                continue
            meta[key] = field.contents()
        tensors = {}
        for t in reader.tensors:
            shape = tuple(int(d) for d in reversed([int(x) for x in t.shape]))
            tensors[t.name] = GGUFTensor(t.name, Q(int(t.tensor_type)), shape,
                                         int(t.data_offset), int(t.n_bytes))
        del reader
    except Exception as e:  # gguf-py says little more than ValueError/IndexError on a short file
        raise _not_gguf(path, f"reading it failed: {type(e).__name__}: {str(e)[:160]}; the file is "
                              "probably truncated (an interrupted download or copy)") from None
    for t in tensors.values():
        if t.offset + t.nbytes > size:
            raise _not_gguf(path, f"tensor {t.name} ends at byte {t.offset + t.nbytes} but the "
                                  f"file has {size}: it is truncated")
    return GGUFModel(path, meta, tensors)


# --- architecture, config ---------------------------------------------------------------------
def _refuse_arch(g: GGUFModel) -> BaseModelError:
    arch = g.arch
    extra = (" (DeepSeek-V2/V3: MLA attention and MoE layers, which this conversion does not "
             "rebuild yet; fine-tune a DeepSeek-V2-Lite from its Hugging Face checkpoint with "
             "--base deepseek-ai/DeepSeek-V2-Lite-Chat instead)") if arch == "deepseek2" else ""
    return BaseModelError(f"{g.path}: architecture {arch!r}{extra} cannot be used as an Ollama "
                          f"base; supported GGUF architectures: {', '.join(SUPPORTED)} (the "
                          "DeepSeek-R1 distills, deepseek-coder, deepseek-llm and other Llama, "
                          "Qwen2 and Qwen3 models)")


def hf_class(arch: str) -> str:
    """The transformers class of a supported GGUF architecture (from catalog.ARCHITECTURES)."""
    return next(cls for cls, (short, garch) in catalog.ARCHITECTURES.items()
                if short == arch and garch == arch)


def _missing(g: GGUFModel, what: str) -> BaseModelError:
    return _not_gguf(g.path, f"its metadata has no {what}")


def llama3_rope_scaling(factors: np.ndarray, theta: float, dim: int) -> dict | None:
    """Llama 3.1 rope scaling parameters that give llama.cpp's `rope_freqs` divisors.

    Each divisor is 1 (high frequencies), `factor` (low) or 1 / ((1 - s) / factor + s) with
    s = old_ctx / ((high - low) * wavelen) - low / (high - low) in between: linear in 1/wavelen,
    so the in-between divisors fix s = a / wavelen + b, and every (low, high, old_ctx) with the
    same a and b gives the same divisors. low_freq_factor = 1 is taken (Llama 3.1's value).
    """
    from ollama_ft.export.gguf import llama3_rope_factors

    factors = np.asarray(factors, dtype=np.float64)
    factor = float(factors.max())
    if factor <= 1 + 1e-6 and factors.min() >= 1 - 1e-6:
        return None  # all ones: no scaling at all
    wavelen = 2 * math.pi * theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    candidates = []
    mid = (factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6))
    if mid.sum() >= 2 and factor > 1:
        s = (1 / factors[mid] - 1 / factor) / (1 - 1 / factor)
        a, b = np.polyfit(1 / wavelen[mid], s, 1)
        if b < 0:
            candidates.append((1.0, round(1 - 1 / b, 4), round(-a / b)))
    candidates.append((1.0, 4.0, 8192))  # Llama 3.1 itself
    ones, fulls = wavelen[factors <= 1 + 1e-6], wavelen[factors >= factor * (1 - 1e-6)]
    if len(ones) and len(fulls):  # no divisor in between: any boundaries between the two fit
        old = max(1, math.ceil(fulls.min()) - 1)
        candidates.append((1.0, math.floor(old / ones.max() / 1.001 * 1e4) / 1e4, old))
    for low, high, old in candidates:
        rs = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
              "high_freq_factor": high, "original_max_position_embeddings": int(old)}
        got = llama3_rope_factors({"rope_theta": theta, "head_dim": dim, "rope_scaling": rs,
                                   "hidden_size": dim, "num_attention_heads": 1})
        if got.shape == factors.shape and np.allclose(got, factors, rtol=1e-4, atol=1e-5):
            return rs
    raise ValueError("rope_freqs does not follow Llama 3 rope scaling")


def config_kwargs(g: GGUFModel) -> dict:
    """transformers config arguments of a supported GGUF (hyperparameters, rope, special ids,
    tying, dtype), from export/gguf.py's table of them read backwards."""
    from gguf import Keys

    from ollama_ft.export.gguf import _common_hparams

    arch = g.arch
    kw: dict = {}
    for hp in _common_hparams():
        value = g.key(hp.key)
        if isinstance(value, list):  # per-layer values: only a constant one fits these classes
            if len(set(value)) != 1:
                raise BaseModelError(f"{g.path}: {hp.key.format(arch=arch)} differs per layer "
                                     f"({value[:4]}...); {hf_class(arch)} has one value for all")
            value = value[0]
        if value is None:
            value = hp.default
        if value is None and hp.config[0] not in ("vocab_size", "num_key_value_heads"):
            raise _missing(g, hp.key.format(arch=arch))
        if value is not None:  # GGUF floats are float32: their shortest repr (1e-05, not 9.99e-06)
            kw[hp.config[0]] = float(str(np.float32(value))) if hp.kind is float else hp.kind(value)
    kw.setdefault("num_key_value_heads", kw["num_attention_heads"])
    embd = g.tensors.get("token_embd.weight")
    if embd is None:
        raise _missing(g, "token_embd.weight tensor")
    kw["vocab_size"] = embd.shape[0]
    head_dim = kw["hidden_size"] // kw["num_attention_heads"]
    key_length, value_length = g.key(Keys.Attention.KEY_LENGTH), g.key(Keys.Attention.VALUE_LENGTH)
    if key_length is not None:
        head_dim = kw["head_dim"] = int(key_length)
    if value_length is not None and int(value_length) != head_dim:
        raise BaseModelError(f"{g.path}: key length {head_dim} and value length {value_length} "
                             f"differ; {hf_class(arch)} has one head_dim")
    rope_dim = g.key(Keys.Rope.DIMENSION_COUNT)
    if rope_dim is not None and int(rope_dim) != head_dim:
        raise BaseModelError(f"{g.path}: rotary embedding covers {rope_dim} of {head_dim} head "
                             f"dimensions; {hf_class(arch)} rotates whole heads")
    rs = _rope_scaling(g, kw["rope_theta"], head_dim)
    if rs:
        kw["rope_scaling"] = rs
    for name, key in (("bos_token_id", Keys.Tokenizer.BOS_ID),
                      ("eos_token_id", Keys.Tokenizer.EOS_ID),
                      ("pad_token_id", Keys.Tokenizer.PAD_ID)):
        if g.meta.get(key) is not None:
            kw[name] = int(g.meta[key])
    kw["tie_word_embeddings"] = "output.weight" not in g.tensors
    if arch == "llama":
        kw["attention_bias"] = "blk.0.attn_q.bias" in g.tensors
        kw["mlp_bias"] = "blk.0.ffn_up.bias" in g.tensors
    matrices = {t.out_dtype for t in g.tensors.values() if len(t.shape) >= 2}
    kw["dtype"] = TORCH_DTYPES[matrices.pop()] if len(matrices) == 1 else "float32"
    return kw


def _rope_scaling(g: GGUFModel, theta: float, head_dim: int) -> dict | None:
    from gguf import Keys

    kind = g.key(Keys.Rope.SCALING_TYPE)
    factor = g.key(Keys.Rope.SCALING_FACTOR)
    if kind is None and g.key(SCALE_LINEAR) is not None:
        kind, factor = "linear", g.key(SCALE_LINEAR)
    rs = None
    if kind in ("linear", "yarn") and factor is not None and float(factor) != 1.0:
        rs = {"rope_type": kind, "factor": float(factor)}
        if kind == "yarn":
            orig = g.key(Keys.Rope.SCALING_ORIG_CTX_LEN)
            if orig is None:
                raise _missing(g, Keys.Rope.SCALING_ORIG_CTX_LEN.format(arch=g.arch))
            rs["original_max_position_embeddings"] = int(orig)
            for name, key in (("extrapolation_factor", Keys.Rope.SCALING_YARN_EXT_FACTOR),
                              ("attention_factor", Keys.Rope.SCALING_YARN_ATTN_FACTOR),
                              ("beta_fast", Keys.Rope.SCALING_YARN_BETA_FAST),
                              ("beta_slow", Keys.Rope.SCALING_YARN_BETA_SLOW)):
                if g.key(key) is not None:
                    rs[name] = float(g.key(key))
    elif kind not in (None, "none", "linear", "yarn"):
        raise BaseModelError(f"{g.path}: rope scaling {kind!r} is not supported (linear, yarn "
                             "and Llama 3's rope_freqs are)")
    freqs = g.tensors.get("rope_freqs.weight")
    if freqs is not None:
        if rs is not None or g.arch != "llama":
            raise BaseModelError(f"{g.path}: a rope_freqs tensor together with {kind} scaling "
                                 f"in a {g.arch} model is not supported")
        factors = _read_tensor(g, freqs).astype(np.float64).reshape(-1)
        try:
            rs = llama3_rope_scaling(factors, theta, head_dim)
        except ValueError:
            raise BaseModelError(f"{g.path}: its rope_freqs tensor is not Llama 3.1 rope scaling "
                                 "(no factor / low / high / original context fits it); this "
                                 "model's rotary embedding cannot be rebuilt") from None
    return rs


def _read_tensor(g: GGUFModel, t: GGUFTensor) -> np.ndarray:
    """A small tensor whole, as float32 (for metadata-like tensors such as rope_freqs)."""
    with open(g.path, "rb") as f:
        f.seek(t.offset)
        raw = np.frombuffer(f.read(t.nbytes), dtype=np.uint8)
    return _decode(raw.reshape(1, -1), t).reshape(t.shape)


def _decode(raw_rows: np.ndarray, t: GGUFTensor) -> np.ndarray:
    """Byte rows of tensor t -> values in the output dtype (stored bits for BF16)."""
    if t.qtype in KEPT_TYPES:
        return np.ascontiguousarray(raw_rows).view(KEPT_TYPES[t.qtype][1])
    return gguf.quants.dequantize(np.ascontiguousarray(raw_rows), t.qtype).astype(np.float32,
                                                                                 copy=False)


# --- tensor names -------------------------------------------------------------------------
@dataclass
class Planned:
    src: GGUFTensor
    hf_name: str
    row_index: np.ndarray | None  # HF row i is GGUF row row_index[i] (llama q/k), else None


def plan_tensors(g: GGUFModel, config) -> list[Planned]:
    """Every GGUF tensor with its HF name, in file order; refuses extra or missing tensors.

    The HF names are those of the transformers model itself (built on the meta device), each
    mapped to GGUF with gguf-py's name map exactly as export does, and that map inverted.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from ollama_ft.export.gguf import EXPORT_SPECS

    arch = g.arch
    spec = EXPORT_SPECS[arch]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tied = set(getattr(model, "all_tied_weights_keys", None) or {}) \
        if config.tie_word_embeddings else set()
    del model
    name_map = gguf.get_tensor_name_map(spec.model_arch(), config.num_hidden_layers)
    to_hf: dict[str, str] = {}
    for hf in shapes:
        gname = name_map.get_name(hf, try_suffixes=(".weight", ".bias"))
        if gname is None:  # pragma: no cover - gguf-py's table and transformers disagree
            raise BaseModelError(f"{g.path}: {hf_class(arch)} has a tensor {hf!r} that gguf-py "
                                 "has no GGUF name for")
        to_hf[gname] = hf
    cfg = config.to_dict()
    plans = []
    for gname, t in g.tensors.items():
        if gname == "rope_freqs.weight":  # Llama 3 rope scaling: now in config.json
            continue
        hf = to_hf.get(gname)
        if hf is None:
            raise BaseModelError(f"{g.path}: tensor {gname} has no place in {hf_class(arch)}; "
                                 f"this GGUF is not a plain {arch} model and cannot be a base")
        if t.shape != shapes[hf]:
            raise BaseModelError(f"{g.path}: tensor {gname} is {list(t.shape)} but "
                                 f"{hf_class(arch)} with this file's hyperparameters expects "
                                 f"{list(shapes[hf])} for {hf}; the metadata and the tensors "
                                 "disagree")
        index = spec.row_index(hf, t.shape[0], cfg)
        plans.append(Planned(t, hf, None if index is None else np.argsort(index)))
    have = {p.hf_name for p in plans}
    missing = [hf for hf in shapes if hf not in have and hf not in tied]
    if missing:
        gnames = {v: k for k, v in to_hf.items()}
        raise BaseModelError(f"{g.path}: {len(missing)} tensor(s) missing, e.g. "
                             f"{gnames[missing[0]]} ({missing[0]}); the file is incomplete")
    return plans


# --- tokenizer ------------------------------------------------------------------------------
def _pre_tokenizer_table() -> dict[str, tuple[tuple, bool]]:
    """tokenizer.ggml.pre -> (split steps as export/vocab.py writes them, ignore_merges).

    export/vocab.py's PRE_TOKENIZERS (the DeepSeek families), plus the names llama.cpp gives
    the same rules, plus SmolLM's and GPT-2's. ignore_merges as llama.cpp's llama-vocab.cpp
    sets it (its Llama 3 group).
    """
    from ollama_ft.export.vocab import DIGITS, LLAMA3_SPLIT, PRE_TOKENIZERS, QWEN2_SPLIT

    gpt2 = ("bytelevel", "use_regex=True, add_prefix_space=False")  # ByteLevel's own GPT-2 regex
    table = {p.name: (p.steps, p.name == "llama-bpe") for p in PRE_TOKENIZERS}
    table.update({
        "llama3": ((("split", LLAMA3_SPLIT),), True),
        "llama-v3": ((("split", LLAMA3_SPLIT),), True),
        "smaug-bpe": ((("split", LLAMA3_SPLIT),), False),
        "dbrx": ((("split", LLAMA3_SPLIT),), False),
        "deepseek-r1-qwen": ((("split", QWEN2_SPLIT),), False),
        "smollm": ((DIGITS, gpt2), False),
        "gpt2": ((gpt2,), False),
    })
    return table


LLAMA3_GROUP_ADDS_BOS = ("llama-bpe", "llama3", "llama-v3")  # llama.cpp's default add_bos


def pre_tokenizer_json(steps: tuple) -> dict:
    """The tokenizer.json `pre_tokenizer` of split steps (export/vocab.py's form)."""
    from ollama_ft.export.vocab import DIGITS

    items, use_regex = [], False
    for step in steps:
        if step == DIGITS:
            items.append({"type": "Digits", "individual_digits": True})
        elif step[0] == "split":
            items.append({"type": "Split", "pattern": {"Regex": step[1]}, "behavior": "Isolated",
                          "invert": False})
        elif step[0] == "bytelevel":
            use_regex = True
        else:  # pragma: no cover - the table has no other kinds
            raise ValueError(step)
    items.append({"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                  "use_regex": use_regex})
    return {"type": "Sequence", "pretokenizers": items}


def tokenizer_json(g: GGUFModel) -> dict:
    """A byte-level BPE tokenizer.json that tokenizes like llama.cpp does with this GGUF."""
    from gguf import Keys

    meta, where = g.meta, g.path
    model = meta.get(Keys.Tokenizer.MODEL)
    if model != "gpt2":
        kind = {"llama": "SentencePiece (llama)"}.get(model, repr(model))
        raise BaseModelError(f"{where}: its tokenizer is {kind}; ollama-ft trains and exports "
                             "byte-level BPE tokenizers only (tokenizer.ggml.model 'gpt2', as "
                             "every DeepSeek family has)")
    pre = meta.get(Keys.Tokenizer.PRE) or "default"
    table = _pre_tokenizer_table()
    if pre not in table:
        raise BaseModelError(f"{where}: llama.cpp pre-tokenizer {pre!r} is not one ollama-ft can "
                             "reproduce (known: " + ", ".join(sorted(table)) + "); training "
                             "would split text differently from Ollama")
    steps, ignore_merges = table[pre]
    tokens = meta.get(Keys.Tokenizer.LIST)
    merges = meta.get(Keys.Tokenizer.MERGES)
    if not tokens or not merges:
        raise _missing(g, "tokenizer.ggml.tokens" if not tokens else "tokenizer.ggml.merges")
    types = meta.get(Keys.Tokenizer.TOKEN_TYPE) or [int(gguf.TokenType.NORMAL)] * len(tokens)
    vocab: dict[str, int] = {}
    for i, text in enumerate(tokens):
        vocab.setdefault(text, i)
    pairs = [m.split(" ") for m in merges]
    bad = next((m for m, p in zip(merges, pairs) if len(p) != 2), None)
    if bad is not None:
        raise _not_gguf(where, f"merge {bad!r} is not two tokens")
    control, user = int(gguf.TokenType.CONTROL), int(gguf.TokenType.USER_DEFINED)
    # llama.cpp matches control and user-defined tokens whole in the text (special=True), never
    # through BPE; their text is stored as is, not in the byte-level alphabet
    added = [{"id": i, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": ty == control}
             for i, (text, ty) in enumerate(zip(tokens, types)) if ty in (control, user)]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": None,  # llama.cpp normalises nothing (not even Qwen's NFC)
        "pre_tokenizer": pre_tokenizer_json(steps),
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": ignore_merges,
                  "vocab": vocab, "merges": pairs},
    }


def save_tokenizer(g: GGUFModel, out_dir: Path, context_length: int | None) -> None:
    """tokenizer.json + tokenizer_config.json (special tokens, BOS policy, chat template)."""
    from gguf import Keys
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tj = tokenizer_json(g)
    try:
        backend = Tokenizer.from_str(json.dumps(tj, ensure_ascii=False))
    except Exception as e:
        raise _not_gguf(g.path, f"its vocabulary does not make a tokenizer: {e}") from None
    meta = g.meta
    texts = meta[Keys.Tokenizer.LIST]

    def token(key):
        i = meta.get(key)
        return texts[int(i)] if i is not None and 0 <= int(i) < len(texts) else None

    pre = meta.get(Keys.Tokenizer.PRE)
    add_bos = meta.get(Keys.Tokenizer.ADD_BOS)
    if add_bos is None:
        add_bos = pre in LLAMA3_GROUP_ADDS_BOS
    kwargs = dict(bos_token=token(Keys.Tokenizer.BOS_ID), eos_token=token(Keys.Tokenizer.EOS_ID),
                  unk_token=token(Keys.Tokenizer.UNK_ID), pad_token=token(Keys.Tokenizer.PAD_ID))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, add_bos_token=bool(add_bos),
        add_eos_token=bool(meta.get(Keys.Tokenizer.ADD_EOS) or False),
        clean_up_tokenization_spaces=False,
        model_max_length=int(context_length) if context_length else int(1e30),
        **{k: v for k, v in kwargs.items() if v is not None})
    template = meta.get(Keys.Tokenizer.CHAT_TEMPLATE)
    if template:
        tok.chat_template = template
    tok.save_pretrained(out_dir, save_jinja_files=False)
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    for junk in ("is_local", "local_files_only"):  # where it was loaded from: not ours
        cfg.pop(junk, None)
    if template:
        cfg["chat_template"] = template
    cfg_path.write_text(json.dumps(cfg, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


# --- writing ------------------------------------------------------------------------------
class _Source:
    """The GGUF's tensor data, memory-mapped; pages read are handed back (madvise)."""

    def __init__(self, path: Path):
        self._file = open(path, "rb")
        self.mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)

    def rows(self, t: GGUFTensor) -> np.ndarray:
        rows = t.shape[0] if len(t.shape) >= 2 else 1
        raw = np.frombuffer(self.mm, dtype=np.uint8, count=t.nbytes, offset=t.offset)
        return raw.reshape(rows, t.nbytes // rows)

    def release(self, start: int, end: int) -> None:
        if not hasattr(mmap, "MADV_DONTNEED"):  # pragma: no cover - not Linux/macOS
            return
        start -= start % PAGE
        try:
            self.mm.madvise(mmap.MADV_DONTNEED, start, min(end, len(self.mm)) - start)
        except (OSError, ValueError):  # pragma: no cover
            pass

    def close(self) -> None:
        try:
            self.mm.close()
        except BufferError:  # pragma: no cover - an array view still alive; the GC closes it
            pass
        self._file.close()


def _tensor_blocks(src: _Source, p: Planned):
    """The output bytes of one planned tensor, block by block."""
    t = p.src
    raw = src.rows(t)
    if len(t.shape) < 2:  # 1-D (norms, biases): small, whole
        values = _decode(raw, t).reshape(t.shape)
        if p.row_index is not None:
            values = values[p.row_index]
        yield values
        src.release(t.offset, t.offset + t.nbytes)
        return
    row_bytes = raw.shape[1]
    for start, stop in row_blocks(t.shape[0], math.prod(t.shape[1:]), BLOCK_ELEMENTS):
        rows = raw[p.row_index[start:stop]] if p.row_index is not None else raw[start:stop]
        yield _decode(rows, t)
        if p.row_index is None:
            src.release(t.offset + start * row_bytes, t.offset + stop * row_bytes)
    src.release(t.offset, t.offset + t.nbytes)


def write_safetensors(g: GGUFModel, plans: list[Planned], out_path: Path, progress=None) -> int:
    """model.safetensors: header planned from the tensor infos, then each tensor appended."""
    entries = [(p.hf_name, p.src.out_dtype, p.src.shape, p.src.out_nbytes) for p in plans]
    head, sizes = _header_bytes(entries)
    src = _Source(g.path)
    try:
        with open(out_path, "wb") as f:
            f.write(head)
            for p, size in zip(plans, sizes):
                written = 0
                for block in _tensor_blocks(src, p):
                    block.tofile(f)
                    written += block.nbytes
                    if progress is not None:
                        progress.update(block.nbytes)
                if written != size:  # pragma: no cover - a planning bug, never user input
                    raise RuntimeError(f"{p.src.name}: wrote {written} bytes, planned {size}")
            f.flush()
            os.fsync(f.fileno())
    finally:
        src.close()
    return len(head) + sum(sizes)


def _disk_full(out_dir: Path, g: GGUFModel, needed: int, free: int | None = None) -> BaseModelError:
    have = f" and {free / 2**30:.2f} GiB are free" if free is not None else ""
    return BaseModelError(f"{out_dir}: not enough disk space for the checkpoint of {g.path}: it "
                          f"needs about {needed / 2**30:.2f} GiB{have}; free some space or set "
                          "OLLAMA_FT_CACHE to a folder on a bigger disk")


def _write_checkpoint(gguf_path: Path, tmp: Path, log=print) -> dict:
    """Everything into the folder tmp (created here). Returns the source record."""
    from tqdm.auto import tqdm
    from transformers import AutoConfig

    g = read_gguf(gguf_path)
    if g.arch not in SUPPORTED:
        raise _refuse_arch(g)
    kw = config_kwargs(g)
    n_tokens = len(g.meta.get("tokenizer.ggml.tokens") or [])
    if n_tokens > kw["vocab_size"]:
        raise _not_gguf(g.path, f"it has {n_tokens} tokens but only {kw['vocab_size']} "
                                "embedding rows")
    dtype = kw.pop("dtype")
    config = AutoConfig.for_model(g.arch, **kw)
    config.architectures = [hf_class(g.arch)]
    config.dtype = dtype
    plans = plan_tensors(g, config)
    types = Counter(t.qtype.name for t in g.tensors.values())
    needed = 8 + sum(p.src.out_nbytes for p in plans) + (64 << 20)
    try:
        tmp.mkdir(parents=True)
    except OSError as e:
        raise BaseModelError(f"{tmp.parent}: cannot write the checkpoint there "
                             f"({e.strerror or e}); choose a writable folder (or set "
                             "OLLAMA_FT_CACHE)") from None
    free = shutil.disk_usage(tmp).free
    if needed > free:
        raise _disk_full(tmp.parent, g, needed, free)
    log(f"converting {g.path.name} ({g.arch}, {config.num_hidden_layers} layers, "
        f"{', '.join(f'{n} {k}' for k, n in types.most_common())}) to a {config.architectures[0]} "
        f"checkpoint ({needed / 2**30:.2f} GiB)")
    try:
        save_tokenizer(g, tmp, kw.get("max_position_embeddings"))
        config.save_pretrained(tmp)
        total = sum(p.src.out_nbytes for p in plans)
        with tqdm(total=total, unit="B", unit_scale=True, desc="dequantizing", leave=False,
                  disable=None) as bar:
            write_safetensors(g, plans, tmp / WEIGHTS_FILE, bar)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _disk_full(tmp.parent, g, needed) from None
        raise
    record = {"format_version": FORMAT_VERSION, "gguf": str(g.path),
              "gguf_bytes": g.path.stat().st_size, "architecture": g.arch,
              "general_name": g.meta.get("general.name"), "tensor_types": dict(types),
              "tokenizer_pre": g.meta.get("tokenizer.ggml.pre")}
    (tmp / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record


def _tmp_dir(out_dir: Path) -> Path:
    return out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")


def _convert(gguf_path: Path, out_dir: Path, log, replace: bool) -> Path:
    import time

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    tmp = _tmp_dir(out_dir)
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        _write_checkpoint(Path(gguf_path), tmp, log)
        if out_dir.exists():
            if not replace:  # another process finished first: theirs is as good
                shutil.rmtree(tmp)
                return out_dir
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"checkpoint ready in {out_dir} ({time.perf_counter() - t0:.0f} s)")
    return out_dir


def checkpoint_from_gguf(gguf_path: str | Path, out_dir: str | Path, log=print) -> Path:
    """Convert a GGUF into a Hugging Face checkpoint folder `out_dir` (replaced if it exists);
    returns its path. Raises BaseModelError for files that cannot be a base."""
    return _convert(Path(gguf_path), Path(out_dir), log, replace=True)


# --- the cache ----------------------------------------------------------------------------
DIGEST = re.compile(r"^(?:sha256[:-])?([0-9a-f]{64})$")


def default_cache_root() -> Path:
    env = os.environ.get("OLLAMA_FT_CACHE")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "ollama-ft") / "bases"


def _cached_ok(path: Path) -> bool:
    try:
        record = json.loads((path / SOURCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return record.get("format_version") == FORMAT_VERSION and (path / WEIGHTS_FILE).is_file()


def _clean_stale(root: Path) -> None:
    """Temp folders of conversions whose process is gone."""
    for p in root.glob(".sha256-*.tmp-*"):
        try:
            os.kill(int(p.name.rsplit("-", 1)[1]), 0)
            continue
        except (ValueError, PermissionError):
            continue
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)


def cached_checkpoint(gguf_path: str | Path, digest: str, cache_root: str | Path | None = None,
                      log=print) -> Path:
    """The checkpoint of a GGUF blob, converted once per blob digest (`sha256:<hex>` or `<hex>`)
    under `cache_root` (default $OLLAMA_FT_CACHE/bases or ~/.cache/ollama-ft/bases)."""
    m = DIGEST.match(str(digest).strip().lower())
    if not m:
        raise BaseModelError(f"{gguf_path}: {digest!r} is not a blob digest (sha256:<64 hex>)")
    root = Path(cache_root).expanduser() if cache_root is not None else default_cache_root()
    out = root / f"sha256-{m.group(1)}"
    if out.is_dir() and _cached_ok(out):
        return out
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BaseModelError(f"{root}: cannot create the checkpoint cache ({e.strerror or e}); "
                             "set OLLAMA_FT_CACHE to a writable folder") from None
    _clean_stale(root)
    log(f"first use of {Path(gguf_path).name}: converting it to a checkpoint in {out} (once)")
    if out.exists():  # an older format or a damaged entry
        shutil.rmtree(out, ignore_errors=True)
    return _convert(Path(gguf_path), out, log, replace=False)
