"""Hugging Face safetensors -> GGUF, per architecture, streaming.

A table per architecture (`EXPORT_SPECS`, keyed by the short name catalog.ARCHITECTURES gives
each Hugging Face class, which also gives the GGUF architecture) says which config.json keys
become which GGUF hyperparameters and which tensors need a transform on the way (llama's rotary
permutation of q/k). Tensor names come from gguf-py's own name map. `write_gguf` plans every
tensor from the headers alone (names, shapes, output types, byte sizes), writes the GGUF header,
then streams each tensor block by block: read rows lazily, add the LoRA delta in fp32, permute,
cast, write.

Output types: 1-D tensors (norms, biases, rope factors) stay F32; 2-D tensors take the file's
type (the direct types of quants.QUANT_TYPES: F32, F16, BF16 or Q8_0; Q8_0 falls back to F16
for rows not divisible by 32, as llama.cpp's converter does).
"""

from __future__ import annotations

import math
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ollama_ft import catalog
from ollama_ft.export.errors import UnsupportedModelError
from ollama_ft.export.merge import MergedModel, f32_to_bf16_bits, row_blocks
from ollama_ft.quants import QUANT_TYPES


# --- hyperparameters ----------------------------------------------------------------------
@dataclass(frozen=True)
class HParam:
    key: str  # gguf key template, "{arch}." prefixed
    config: tuple[str, ...]  # config.json keys tried in order ("a.b" looks inside a dict)
    kind: type = int
    default: object = None  # None: required


def _common_hparams():
    from gguf import Keys

    return (
        HParam(Keys.LLM.CONTEXT_LENGTH, ("max_position_embeddings",)),
        HParam(Keys.LLM.EMBEDDING_LENGTH, ("hidden_size",)),
        HParam(Keys.LLM.FEED_FORWARD_LENGTH, ("intermediate_size",)),
        HParam(Keys.LLM.BLOCK_COUNT, ("num_hidden_layers",)),
        HParam(Keys.Attention.HEAD_COUNT, ("num_attention_heads",)),
        HParam(Keys.Attention.HEAD_COUNT_KV, ("num_key_value_heads", "num_attention_heads")),
        HParam(Keys.Attention.LAYERNORM_RMS_EPS, ("rms_norm_eps",), float),
        HParam(Keys.Rope.FREQ_BASE, ("rope_theta", "rope_parameters.rope_theta",
                                     "rope_scaling.rope_theta"), float, 10000.0),
        HParam(Keys.LLM.VOCAB_SIZE, ("vocab_size",)),
    )


@dataclass(frozen=True)
class RowPermutation:
    """A tensor transform: reorder output rows (of a weight, its bias and its LoRA B).

    llama.cpp's `llama` architecture rotates interleaved pairs, Hugging Face's Llama rotates
    the two halves of each head: q and k rows are regrouped per head (`rotary_permutation`).
    """

    pattern: str  # regex on the Hugging Face tensor name
    heads: tuple[str, ...]  # config keys of the head count, first present wins

    def index(self, name: str, rows: int, config: dict) -> np.ndarray | None:
        if not re.search(self.pattern, name):
            return None
        n_head = next(int(config[k]) for k in self.heads if config.get(k))
        return rotary_permutation(rows, n_head)


LLAMA_ROTARY = (RowPermutation(r"\.q_proj\.(weight|bias)$", ("num_attention_heads",)),
                RowPermutation(r"\.k_proj\.(weight|bias)$",
                               ("num_key_value_heads", "num_attention_heads")))


@dataclass(frozen=True)
class ArchSpec:
    """What one architecture needs to become a GGUF llama.cpp runs."""

    name: str  # short name, as catalog.ARCHITECTURES gives it (llama, qwen2, qwen3)
    transforms: tuple[RowPermutation, ...] = ()
    head_dim_keys: bool = False  # write key_length/value_length (head_dim set explicitly)
    rope_types: tuple[str, ...] = ("default", "linear")
    skip: tuple[str, ...] = ("rotary_emb.inv_freq",)  # tensor name endings with no GGUF twin
    # (config, common hparams, where) -> the architecture's hparams (deepseek2's MLA and MoE)
    hparam_hook: Callable | None = None
    # (model, config, out type, where) -> (plans, consumed source names): tensors that are not
    # one source each (deepseek2's stacked experts and split kv_b)
    tensor_hook: Callable | None = None

    @property
    def gguf_arch(self) -> str:
        """gguf.MODEL_ARCH name, lower case (llama, qwen2, qwen3), from the catalogue."""
        return catalog.gguf_architecture(self.name)

    def model_arch(self):
        import gguf

        return next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == self.gguf_arch)

    def row_index(self, name: str, rows: int, config: dict) -> np.ndarray | None:
        """The output-row order of tensor `name` (None: unchanged)."""
        for t in self.transforms:
            index = t.index(name, rows, config)
            if index is not None:
                return index
        return None


def _deepseek2(name: str):
    from ollama_ft.export import deepseek2

    return ArchSpec(name, rope_types=("default", "yarn"), hparam_hook=deepseek2.hparams,
                    tensor_hook=deepseek2.special_tensors)


EXPORT_SPECS: dict[str, ArchSpec] = {s.name: s for s in (
    ArchSpec("llama", transforms=LLAMA_ROTARY, rope_types=("default", "linear", "llama3")),
    ArchSpec("qwen2", rope_types=("default", "linear", "yarn")),
    ArchSpec("qwen3", head_dim_keys=True, rope_types=("default", "linear", "yarn")),
    _deepseek2("deepseek2"),  # V2, V2-Lite
    _deepseek2("deepseek3"),  # V3, R1: the same GGUF architecture
)}


def arch_spec(config: dict, where: str) -> ArchSpec:
    """The export spec of a config.json's architecture (via catalog.ARCHITECTURES)."""
    archs = config.get("architectures") or [config.get("model_type", "?")]
    spec = EXPORT_SPECS.get(catalog.short_name(archs[0]) or "")
    if spec is None:
        known = [k for k, (short, _) in catalog.ARCHITECTURES.items() if short in EXPORT_SPECS]
        raise UnsupportedModelError(f"{where}: architecture {archs[0]} has no GGUF table; "
                                    f"export supports {', '.join(known)}")
    return spec


def _lookup(config: dict, key: str):
    node = config
    for part in key.split("."):
        if not isinstance(node, dict) or node.get(part) is None:
            return None
        node = node[part]
    return node


def rope_scaling(config: dict) -> dict | None:
    """The rope scaling dict (transformers 4 `rope_scaling` or 5 `rope_parameters`), or None."""
    for key in ("rope_scaling", "rope_parameters"):
        rs = config.get(key)
        if isinstance(rs, dict):
            kind = rs.get("rope_type", rs.get("type"))
            if kind and kind != "default":
                return {**rs, "rope_type": kind}
    return None


def head_dim(config: dict) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def hparams(spec: ArchSpec, config: dict, where: str) -> list[tuple[str, object, type]]:
    """(gguf key, value, type) of every hyperparameter of `spec` for this config."""
    from gguf import Keys

    out = []
    for hp in _common_hparams():
        value = next((v for v in (_lookup(config, k) for k in hp.config) if v is not None),
                     hp.default)
        if value is None:
            raise UnsupportedModelError(f"{where}: config.json has no {hp.config[0]} "
                                        f"(needed for {hp.key.format(arch=spec.gguf_arch)})")
        out.append((hp.key.format(arch=spec.gguf_arch), hp.kind(value), hp.kind))
    hd = head_dim(config)
    out.append((Keys.Rope.DIMENSION_COUNT.format(arch=spec.gguf_arch), hd, int))
    if spec.head_dim_keys or config.get("head_dim"):
        out.append((Keys.Attention.KEY_LENGTH.format(arch=spec.gguf_arch), hd, int))
        out.append((Keys.Attention.VALUE_LENGTH.format(arch=spec.gguf_arch), hd, int))
    rs = rope_scaling(config)
    if rs:
        kind = rs["rope_type"]
        if kind not in spec.rope_types:
            raise UnsupportedModelError(f"{where}: rope scaling {kind!r} is not supported for "
                                        f"{spec.name} models (supported: "
                                        f"{', '.join(spec.rope_types)})")
        arch = spec.gguf_arch
        if kind in ("linear", "yarn"):
            out.append((Keys.Rope.SCALING_TYPE.format(arch=arch), kind, str))
            out.append((Keys.Rope.SCALING_FACTOR.format(arch=arch), float(rs["factor"]), float))
        if kind == "yarn":
            out.append((Keys.Rope.SCALING_ORIG_CTX_LEN.format(arch=arch),
                        int(rs["original_max_position_embeddings"]), int))
            # as llama.cpp's converter: the YaRN knobs the config sets
            for key, gkey in (("extrapolation_factor", Keys.Rope.SCALING_YARN_EXT_FACTOR),
                              ("attention_factor", Keys.Rope.SCALING_YARN_ATTN_FACTOR),
                              ("beta_fast", Keys.Rope.SCALING_YARN_BETA_FAST),
                              ("beta_slow", Keys.Rope.SCALING_YARN_BETA_SLOW)):
                if rs.get(key) is not None:
                    out.append((gkey.format(arch=arch), float(rs[key]), float))
    if spec.hparam_hook is not None:
        out = spec.hparam_hook(config, out, where)
    return out


def llama3_rope_factors(config: dict) -> np.ndarray:
    """Per-frequency divisors of Llama 3.1 rope scaling (llama.cpp's rope_freqs tensor)."""
    rs = rope_scaling(config)
    base = float(_lookup(config, "rope_theta") or _lookup(config, "rope_parameters.rope_theta")
                 or rs.get("rope_theta") or 10000.0)
    dim = head_dim(config)
    factor = float(rs.get("factor", 8.0))
    low, high = float(rs.get("low_freq_factor", 1.0)), float(rs.get("high_freq_factor", 4.0))
    old_ctx = float(rs.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    wavelen = 2 * math.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    factors = np.where(wavelen < old_ctx / high, 1.0,
                       np.where(wavelen > old_ctx / low, factor,
                                1.0 / ((1 - smooth) / factor + smooth)))
    return factors.astype(np.float32)


# --- tensor transforms --------------------------------------------------------------------
def rotary_permutation(rows: int, n_head: int) -> np.ndarray:
    """Row order taking HF's half-split rotary layout to llama.cpp's interleaved pairs.

    Output row (h, i, j) comes from input row (h, j, i) of a (heads, 2, head_dim/2) grid.
    """
    half = rows // n_head // 2
    return np.arange(rows).reshape(n_head, 2, half).swapaxes(1, 2).reshape(rows)


# --- planning -----------------------------------------------------------------------------
@dataclass
class TensorPlan:
    gguf_name: str
    shape: tuple[int, ...]
    qtype: object  # gguf.GGMLQuantizationType
    nbytes: int
    source: str | None  # HF tensor name, None for generated tensors
    row_index: np.ndarray | None = None  # output row i comes from source row row_index[i]
    generate: Callable[[], np.ndarray] | None = None


# The types written here (F32, F16, BF16, Q8_0), by tensor type name.
DIRECT_TYPES = {q.gguf_type: q for q in QUANT_TYPES.values() if q.direct}


def _tensor_type(shape, out_type: str):
    import gguf

    Q = gguf.GGMLQuantizationType
    if len(shape) <= 1 or out_type == "F32":
        return Q.F32
    if out_type == "Q8_0":
        return Q.Q8_0 if shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0] == 0 else Q.F16
    return Q[out_type]


def _nbytes(shape, qtype) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n = math.prod(shape)
    return n // block * size


def plan_tensors(model: MergedModel, spec: ArchSpec, config: dict, out_type: str,
                 where: str) -> list[TensorPlan]:
    import gguf

    n_blocks = int(config["num_hidden_layers"])
    name_map = gguf.get_tensor_name_map(spec.model_arch(), n_blocks)
    allowed = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[spec.model_arch()]}
    plans: list[TensorPlan] = []
    used: set[str] = set()
    if spec.tensor_hook is not None:
        plans, used = spec.tensor_hook(model, config, out_type, where)
    for name in model.ckpt.names():
        if name in used or any(name.endswith(s) for s in spec.skip):
            continue
        gguf_name = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        generic = re.sub(r"^blk\.\d+\.", "blk.{bid}.", gguf_name.rsplit(".", 1)[0]) if gguf_name else None
        if generic not in allowed:
            raise UnsupportedModelError(f"{where}: tensor {name!r} has no place in a "
                                        f"{spec.gguf_arch} GGUF; this checkpoint is not a plain "
                                        f"{spec.name} model")
        info = model.ckpt.info(name)
        if info.dtype not in ("F32", "F16", "BF16", "F64"):
            raise UnsupportedModelError(f"{where}: tensor {name!r} is {info.dtype}; export reads "
                                        "float checkpoints only (not pre-quantized ones)")
        shape = info.shape
        qtype = _tensor_type(shape, out_type)
        index = spec.row_index(name, shape[0], config)
        plans.append(TensorPlan(gguf_name, shape, qtype, _nbytes(shape, qtype), name, index))
    rs = rope_scaling(config)
    if rs and rs["rope_type"] == "llama3":
        factors = llama3_rope_factors(config)
        Q = gguf.GGMLQuantizationType
        plans.append(TensorPlan(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight",
                                factors.shape, Q.F32, factors.nbytes, None,
                                generate=lambda f=factors: f))
    plans.sort(key=_tensor_order)
    return plans


def _tensor_order(p: TensorPlan):
    parts = p.gguf_name.split(".")
    if parts[0] == "blk":
        return (1, int(parts[1]), p.gguf_name)
    return (0 if parts[0] in ("token_embd", "rope_freqs") else 2, 0, p.gguf_name)


# --- streaming tensor data ----------------------------------------------------------------
def _blocks(plan: TensorPlan) -> list[tuple[int, int]]:
    if plan.generate is not None:
        return [(0, 0)]
    return list(row_blocks(plan.shape[0], math.prod(plan.shape[1:]), BLOCK_ELEMENTS))


BLOCK_ELEMENTS = 2 * 1024 * 1024  # ~8 MB of fp32 per block: enough blocks to share out


class BlockPipeline:
    """Computes the encoded blocks of every planned tensor, in file order, on a few threads.

    numpy releases the GIL in the heavy parts (bf16 -> fp32, B @ A, casts), so blocks are
    computed in parallel while the writer writes them in order. At most `lookahead` blocks
    are in flight, which bounds memory.
    """

    def __init__(self, plans: list[TensorPlan], model: MergedModel, threads: int | None = None):
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        self.model = model
        self.threads = max(1, threads or min(8, os.cpu_count() or 1))
        self.lookahead = 2 * self.threads + 1
        self._tasks = iter([(p, s, e) for p in plans for s, e in _blocks(p)])
        self._pending: deque = deque()
        self._pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None

    def _submit(self) -> None:
        while len(self._pending) < self.lookahead:
            task = next(self._tasks, None)
            if task is None:
                return
            if self._pool is None:
                self._pending.append(_Done(self._compute(*task)))
            else:
                self._pending.append(self._pool.submit(self._compute, *task))

    def next_block(self) -> np.ndarray:
        self._submit()
        return self._pending.popleft().result()

    def _compute(self, p: TensorPlan, start: int, stop: int) -> np.ndarray:
        if p.generate is not None:
            return np.ascontiguousarray(_encode(np.asarray(p.generate(), dtype=np.float32), p.qtype))
        model, name = self.model, p.source
        # no delta, no transform, same type: the stored bits are the output bits
        passthrough = (not model.has_delta(name) and p.row_index is None
                       and p.qtype.name == model.ckpt.info(name).dtype)
        if passthrough:
            block = np.array(model.ckpt.raw_rows(name, start, stop))  # a copy: pages released
        else:
            block = _encode(model.rows(name, start, stop, p.row_index), p.qtype)
        if p.row_index is None:
            model.release(name, start, stop)
        return np.ascontiguousarray(block)

    def close(self) -> None:
        if self._pool is not None:
            for f in self._pending:
                f.cancel()
            self._pool.shutdown(wait=True)
            self._pool = None


class _Done:
    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value

    def cancel(self):
        return False


class StreamedTensor:
    """What GGUFWriter.write_tensor_data needs (nbytes, tofile); data comes from the pipeline."""

    def __init__(self, plan: TensorPlan, pipeline: BlockPipeline):
        self.plan, self.pipeline = plan, pipeline
        self.nbytes = plan.nbytes
        self.shape = plan.shape

    def byteswap(self, inplace=False):  # pragma: no cover - only on big-endian hosts
        raise UnsupportedModelError("writing GGUF on a big-endian machine is not supported")

    def tofile(self, fout) -> None:
        p = self.plan
        written = 0
        for _ in _blocks(p):
            block = self.pipeline.next_block()
            block.tofile(fout)
            written += block.nbytes
        if p.source is not None:
            self.pipeline.model.release(p.source)
        if written != p.nbytes:  # pragma: no cover - a planning bug, never user input
            raise RuntimeError(f"{p.gguf_name}: wrote {written} bytes, planned {p.nbytes}")


def _encode(block: np.ndarray, qtype) -> np.ndarray:
    import gguf

    Q = gguf.GGMLQuantizationType
    if qtype == Q.F32:
        return block.astype(np.float32, copy=False)
    if qtype == Q.F16:
        return block.astype(np.float16)
    if qtype == Q.BF16:
        return f32_to_bf16_bits(block)
    return gguf.quants.quantize(block, qtype)


# --- the writer ---------------------------------------------------------------------------
@dataclass
class GeneralMetadata:
    name: str
    basename: str | None = None
    finetune: str | None = None
    size_label: str | None = None
    license: str | None = None
    base_model_name: str | None = None
    base_model_org: str | None = None
    base_model_repo_url: str | None = None
    extra: dict = field(default_factory=dict)


def add_base_model(writer, meta: GeneralMetadata) -> None:
    """general.base_model.* : what the model (or adapter) was fine-tuned from."""
    if meta.base_model_name:
        writer.add_base_model_count(1)
        writer.add_base_model_name(0, meta.base_model_name)
        if meta.base_model_org:
            writer.add_base_model_organization(0, meta.base_model_org)
        if meta.base_model_repo_url:
            writer.add_base_model_repo_url(0, meta.base_model_repo_url)


def add_general(writer, meta: GeneralMetadata, file_type: int | None) -> None:
    import gguf

    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(meta.name)
    if meta.basename:
        writer.add_basename(meta.basename)
    if meta.finetune:
        writer.add_finetune(meta.finetune)
    if meta.size_label:
        writer.add_size_label(meta.size_label)
    if meta.license:
        writer.add_license(meta.license)
    add_base_model(writer, meta)
    if file_type is not None:
        writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_kv(writer, key: str, value, kind) -> None:
    if kind is bool:
        writer.add_bool(key, bool(value))
    elif kind is int:
        writer.add_uint32(key, int(value))
    elif kind is float:
        writer.add_float32(key, float(value))
    else:
        writer.add_string(key, str(value))


def write_gguf(out_path: Path, model: MergedModel, config: dict, out_type: str,
               tokenizer_meta, general: GeneralMetadata, where: str, log=print,
               threads: int | None = None) -> int:
    """Write a complete GGUF to `out_path` (the caller renames it into place). Returns bytes."""
    from ollama_ft.export.vocab import add_tokenizer_to_gguf

    if out_type not in DIRECT_TYPES:
        raise UnsupportedModelError(f"{out_type} is not written directly; use quantize.py")
    spec = arch_spec(config, where)
    plans = plan_tensors(model, spec, config, out_type, where)
    hp = hparams(spec, config, where)
    with synced_writer(spec.gguf_arch) as writer:
        add_general(writer, general, DIRECT_TYPES[out_type].file_type)
        for key, value, kind in hp:
            _add_kv(writer, key, value, kind)
        add_tokenizer_to_gguf(writer, tokenizer_meta)
        for p in plans:
            writer.add_tensor_info(p.gguf_name, p.shape, np.dtype(np.float32), p.nbytes,
                                   raw_dtype=p.qtype)
        writer.write_header_to_file(Path(out_path))
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        pipeline = BlockPipeline(plans, model, threads)
        try:
            for p in plans:
                writer.write_tensor_data(StreamedTensor(p, pipeline))
        finally:
            pipeline.close()
    return Path(out_path).stat().st_size


@contextmanager
def synced_writer(gguf_arch: str):
    """A GGUFWriter that is on disk (flushed, fsynced) when the block ends well, and closed
    either way."""
    import gguf

    writer = gguf.GGUFWriter(path=None, arch=gguf_arch)
    try:
        yield writer
        for fout in writer.fout or []:
            fout.flush()
            os.fsync(fout.fileno())
    finally:
        writer.close()
