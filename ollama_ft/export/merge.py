"""Lazy merge of a PEFT LoRA adapter into a base checkpoint, a few rows at a time.

Nothing here loads a model. The base safetensors files are memory-mapped; a tensor is
read in row blocks, the adapter's delta `scale * B[rows] @ A` is added in fp32 where the
adapter has one, and the caller casts and writes the block. Pages already used are
handed back to the kernel (madvise), so the resident memory stays around a few blocks,
not the model, however large the checkpoint.

Also here: `write_merged_safetensors`, the streaming writer behind `ollama-ft merge RUN`.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ollama_ft.export.errors import AdapterError, CheckpointError

# safetensors dtype -> (numpy dtype of the stored bits, bytes per element)
ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
MAX_HEADER = 100 * 1024 * 1024
CHUNK_ELEMENTS = 4 * 1024 * 1024  # rows per block: about 16 MB of fp32
PAGE = mmap.PAGESIZE


# --- reading safetensors ------------------------------------------------------------------
@dataclass
class StoredTensor:
    name: str
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]
    begin: int  # byte offsets inside the data section
    end: int

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def row_elements(self) -> int:
        return math.prod(self.shape[1:]) if len(self.shape) > 1 else (self.shape[0] if self.shape else 1)


class SafetensorsFile:
    """One .safetensors file: header parsed and checked up front, data memory-mapped on use."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise self._corrupt(f"{size} bytes, shorter than a safetensors header")
                n = int.from_bytes(head, "little")
                if n < 2 or n > MAX_HEADER or 8 + n > size:
                    raise self._corrupt(f"its header length field says {n} bytes but the file "
                                        f"has {size}")
                raw = f.read(n)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot be read ({e.strerror or e})") from None
        try:
            header = json.loads(raw.decode("utf-8"))
            if not isinstance(header, dict):
                raise ValueError
        except (UnicodeDecodeError, ValueError):
            raise self._corrupt("its header is not valid JSON") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        data_len = size - self.data_start
        self.tensors: dict[str, StoredTensor] = {}
        for name, info in header.items():
            try:
                dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
                itemsize = np.dtype(ST_DTYPES[dtype]).itemsize
            except (KeyError, TypeError, ValueError):
                raise self._corrupt(f"tensor {name!r} has a malformed header entry {info!r}") from None
            if end - begin != math.prod(shape) * itemsize or begin < 0:
                raise self._corrupt(f"tensor {name!r} ({dtype} {list(shape)}) has data offsets "
                                    f"{begin}..{end} that do not match its size")
            if end > data_len:
                raise self._corrupt(f"tensor {name!r} ends at data byte {end} but the file holds "
                                    f"only {data_len}: the file is truncated (an interrupted "
                                    "download or copy?)")
            self.tensors[name] = StoredTensor(name, dtype, shape, begin, end)
        self._file = None
        self._mm: mmap.mmap | None = None
        self._lock = threading.Lock()

    def _corrupt(self, why: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: not a valid safetensors file ({why}); download or "
                               "save the checkpoint again")

    def raw(self, name: str) -> np.ndarray:
        """The stored bits of a tensor as a read-only array view of the mapping (no copy)."""
        t = self.tensors[name]
        with self._lock:  # blocks are read from several threads
            if self._mm is None:
                self._file = open(self.path, "rb")
                self._mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        count = math.prod(t.shape)
        arr = np.frombuffer(self._mm, dtype=ST_DTYPES[t.dtype], count=count,
                            offset=self.data_start + t.begin)
        return arr.reshape(t.shape)

    def release(self, name: str, row_start: int = 0, row_stop: int | None = None) -> None:
        """Drop the mapped pages of rows [row_start, row_stop) from this process's memory."""
        if self._mm is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        t = self.tensors[name]
        row_bytes = (t.end - t.begin) // max(t.rows, 1)
        stop = t.rows if row_stop is None else row_stop
        start = self.data_start + t.begin + row_start * row_bytes
        end = self.data_start + t.begin + stop * row_bytes
        start -= start % PAGE
        if end > start:
            try:
                self._mm.madvise(mmap.MADV_DONTNEED, start, min(end, len(self._mm)) - start)
            except (OSError, ValueError):
                pass

    def close(self) -> None:
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # an array view is still alive; the GC closes it later
                pass
            self._mm = None
        if self._file is not None:
            self._file.close()
            self._file = None


def to_f32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Stored bits -> a new fp32 array."""
    if dtype == "BF16":  # bf16 bits are the high half of an fp32
        out = np.empty(raw.shape, np.uint32)
        np.left_shift(raw, 16, out=out, dtype=np.uint32, casting="unsafe")
        return out.view(np.float32)
    return raw.astype(np.float32)


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 bits (uint16), round to nearest even, NaN kept quiet."""
    n = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    n = np.where((n & 0x7FFFFFFF) > 0x7F800000, (n & np.uint32(0xFFFF0000)) | np.uint32(64 << 16), n)
    return ((n.astype(np.uint64) + (0x7FFF + ((n >> 16) & 1))) >> 16).astype(np.uint16)


class Checkpoint:
    """All safetensors files of a Hugging Face checkpoint folder, tensors found by name."""

    def __init__(self, base_dir: Path):
        self.dir = Path(base_dir)
        index = self.dir / "model.safetensors.index.json"
        self.weight_map: dict[str, str] | None = None
        if index.is_file():
            try:
                self.weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (ValueError, KeyError, TypeError):
                raise CheckpointError(f"{index}: not a valid safetensors index (no weight_map); "
                                      "download the checkpoint again") from None
            names = sorted(set(self.weight_map.values()))
            missing = [n for n in names if not (self.dir / n).is_file()]
            if missing:
                raise CheckpointError(f"{index}: lists {', '.join(missing)} but "
                                      f"{'it is' if len(missing) == 1 else 'they are'} not in "
                                      f"{self.dir}; the download is incomplete: fetch it again")
            paths = [self.dir / n for n in names]
        else:
            paths = sorted(self.dir.glob("*.safetensors"))
        if not paths:
            raise CheckpointError(f"{self.dir}: no *.safetensors weights; export needs the base "
                                  "checkpoint in safetensors format")
        self.files = [SafetensorsFile(p) for p in paths]
        self._where: dict[str, SafetensorsFile] = {}
        for sf in self.files:
            for name in sf.tensors:
                if name in self._where:
                    raise CheckpointError(f"{sf.path}: tensor {name!r} is also in "
                                          f"{self._where[name].path}; the folder mixes two "
                                          "checkpoints")
                self._where[name] = sf
        if self.weight_map is not None:
            for name, fname in self.weight_map.items():
                sf = self._where.get(name)
                if sf is None or sf.path.name != fname:
                    raise CheckpointError(f"{index}: says {name!r} is in {fname}, but it is not "
                                          "there; download the checkpoint again")

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def info(self, name: str) -> StoredTensor:
        return self._where[name].tensors[name]

    def file_of(self, name: str) -> SafetensorsFile:
        return self._where[name]

    def raw_rows(self, name: str, start: int, stop: int, index: np.ndarray | None = None):
        raw = self._where[name].raw(name)
        if raw.ndim == 0:
            return raw.reshape(1)
        return raw[index[start:stop]] if index is not None else raw[start:stop]

    def rows_f32(self, name: str, start: int, stop: int, index: np.ndarray | None = None):
        return to_f32(self.raw_rows(name, start, stop, index), self.info(name).dtype)

    def release(self, name: str, start: int = 0, stop: int | None = None) -> None:
        self._where[name].release(name, start, stop)

    def parameter_count(self) -> int:
        return sum(math.prod(sf.tensors[n].shape) for sf in self.files for n in sf.tensors)

    def nbytes(self) -> int:
        return sum(t.end - t.begin for sf in self.files for t in sf.tensors.values())

    def close(self) -> None:
        for sf in self.files:
            sf.close()


# --- the adapter --------------------------------------------------------------------------
PEFT_PREFIX = "base_model.model."


@dataclass
class LoraModule:
    target: str  # the base weight it changes, e.g. model.layers.0.self_attn.q_proj.weight
    a_key: str
    b_key: str
    rank: int
    alpha: float
    scale: float
    magnitude_key: str | None = None  # DoRA


@dataclass
class LoraAdapter:
    dir: Path
    config: dict
    file: SafetensorsFile
    modules: dict[str, LoraModule] = field(default_factory=dict)
    replacements: dict[str, str] = field(default_factory=dict)  # base weight -> adapter key

    @property
    def dora(self) -> bool:
        return any(m.magnitude_key for m in self.modules.values())

    @property
    def rslora(self) -> bool:
        return bool(self.config.get("use_rslora"))

    def a(self, m: LoraModule) -> np.ndarray:
        return to_f32(self.file.raw(m.a_key), self.file.tensors[m.a_key].dtype)

    def b(self, m: LoraModule) -> np.ndarray:
        return to_f32(self.file.raw(m.b_key), self.file.tensors[m.b_key].dtype)

    def magnitude(self, m: LoraModule) -> np.ndarray | None:
        if not m.magnitude_key:
            return None
        return to_f32(self.file.raw(m.magnitude_key), self.file.tensors[m.magnitude_key].dtype)

    def close(self) -> None:
        self.file.close()


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern: the first key matching the module path's tail."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


def load_adapter(adapter_dir: Path) -> LoraAdapter:
    adapter_dir = Path(adapter_dir)
    cfg_path = adapter_dir / "adapter_config.json"
    if not adapter_dir.is_dir() or not cfg_path.is_file():
        raise AdapterError(f"{adapter_dir}: no LoRA adapter here (adapter_config.json missing); "
                           "train one first with `ollama-ft train`, or point at the run "
                           "directory that holds adapter/")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise AdapterError(f"{cfg_path}: invalid JSON ({e}); the adapter is damaged: train "
                           "again or restore it from a checkpoint") from None
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise AdapterError(f"{cfg_path}: peft_type is {config.get('peft_type')!r}; only LoRA "
                           "adapters can be exported")
    if config.get("fan_in_fan_out"):
        raise AdapterError(f"{cfg_path}: fan_in_fan_out adapters (GPT-2 Conv1D layers) are not "
                           "supported; DeepSeek bases use plain Linear layers")
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        hint = (" (only adapter_model.bin, a pickle: load it with PEFT and save it again with "
                "safe_serialization=True)") if (adapter_dir / "adapter_model.bin").is_file() else ""
        raise AdapterError(f"{adapter_dir}: adapter_model.safetensors missing{hint}; train again "
                           "or restore the adapter")
    try:
        sf = SafetensorsFile(weights)
    except Exception as e:  # CheckpointError wording is about checkpoints
        raise AdapterError(str(e).replace("download or save the checkpoint again",
                                          "train again or restore the adapter")) from None
    adapter = LoraAdapter(adapter_dir, config, sf)
    r_default = int(config.get("r") or 8)
    alpha_default = float(config.get("lora_alpha") or r_default)
    rslora = bool(config.get("use_rslora"))
    parts: dict[str, dict[str, str]] = {}
    for key in sf.tensors:
        if not key.startswith(PEFT_PREFIX):
            raise AdapterError(f"{weights}: tensor {key!r} is not a PEFT LoRA tensor "
                               f"(no {PEFT_PREFIX!r} prefix)")
        path = key[len(PEFT_PREFIX):]
        m = re.fullmatch(r"(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight", path)
        if m:
            parts.setdefault(m.group(1), {})[m.group(2)] = key
            continue
        m = re.fullmatch(r"(.+)\.lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?", path)
        if m:
            parts.setdefault(m.group(1), {})["magnitude"] = key
            continue
        if ".lora_" in path:
            raise AdapterError(f"{weights}: tensor {key!r} is a kind of adapter weight export "
                               "does not support (LoRA on embeddings, LoRA biases); retrain "
                               "with LoRA on linear layers only (the default)")
        m = re.fullmatch(r"(.+?)(?:\.base_layer|\.modules_to_save(?:\.[^.]+)?)?\.(weight|bias)", path)
        if not m:
            raise AdapterError(f"{weights}: tensor {key!r} is not a LoRA weight or a saved module")
        adapter.replacements[f"{m.group(1)}.{m.group(2)}"] = key
    for module, p in parts.items():
        if "lora_A" not in p or "lora_B" not in p:
            raise AdapterError(f"{weights}: {module} has {', '.join(sorted(p))} but not both "
                               "lora_A and lora_B; the adapter file is incomplete")
        a_shape, b_shape = sf.tensors[p["lora_A"]].shape, sf.tensors[p["lora_B"]].shape
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
            raise AdapterError(f"{weights}: {module}: lora_A {list(a_shape)} and lora_B "
                               f"{list(b_shape)} do not form a rank-r pair")
        rank = a_shape[0]
        alpha = float(_pattern_value(config.get("alpha_pattern"), module, alpha_default))
        scale = alpha / math.sqrt(rank) if rslora else alpha / rank
        adapter.modules[f"{module}.weight"] = LoraModule(f"{module}.weight", p["lora_A"],
                                                        p["lora_B"], rank, alpha, scale,
                                                        p.get("magnitude"))
    if not adapter.modules and not adapter.replacements:
        raise AdapterError(f"{weights}: holds no LoRA weights")
    return adapter


# --- the merged view ------------------------------------------------------------------------
class MergedModel:
    """The base checkpoint with the adapter folded in, read block by block."""

    def __init__(self, checkpoint: Checkpoint, adapter: LoraAdapter | None = None,
                 trained_on: str | None = None):
        self.ckpt = checkpoint
        self.adapter = adapter
        self._trained_on = trained_on
        if adapter is not None:
            self._check_fit()

    def _check_fit(self) -> None:
        ad, ck = self.adapter, self.ckpt
        base_hint = ad.config.get("base_model_name_or_path") or self._trained_on
        hint = (f"; it was trained on {base_hint}" if base_hint else "") + (
            ": export it with the base it was trained on")
        where = ad.file.path
        for target, m in ad.modules.items():
            if target not in ck:
                raise AdapterError(f"{where}: the adapter changes {target}, which the base "
                                   f"{ck.dir} does not have{hint}")
            w = ck.info(target).shape
            a = ad.file.tensors[m.a_key].shape
            b = ad.file.tensors[m.b_key].shape
            if len(w) != 2 or a[1] != w[1] or b[0] != w[0]:
                raise AdapterError(f"{where}: shape mismatch at {target}: base weight is {list(w)} "
                                   f"but the adapter's lora_A is {list(a)} and lora_B {list(b)} "
                                   f"(expects [r, {w[1] if len(w) == 2 else '?'}] and "
                                   f"[{w[0]}, r]){hint}")
            if m.magnitude_key and ad.file.tensors[m.magnitude_key].shape != (w[0],):
                raise AdapterError(f"{where}: DoRA magnitude of {target} has shape "
                                   f"{list(ad.file.tensors[m.magnitude_key].shape)}, expected "
                                   f"[{w[0]}]{hint}")
        for target, key in ad.replacements.items():
            if target not in ck:
                raise AdapterError(f"{where}: the adapter saves a full copy of {target}, which the "
                                   f"base {ck.dir} does not have{hint}")
            if ad.file.tensors[key].shape != ck.info(target).shape:
                raise AdapterError(f"{where}: shape mismatch at {target}: base is "
                                   f"{list(ck.info(target).shape)}, the adapter's copy is "
                                   f"{list(ad.file.tensors[key].shape)}{hint}")

    def has_delta(self, name: str) -> bool:
        return self.adapter is not None and (name in self.adapter.modules
                                             or name in self.adapter.replacements)

    def rows(self, name: str, start: int, stop: int, index: np.ndarray | None = None) -> np.ndarray:
        """fp32 rows [start, stop) of the merged tensor (rows picked through `index` if given)."""
        ad = self.adapter
        if ad is not None and name in ad.replacements:
            key = ad.replacements[name]
            raw = ad.file.raw(key)
            raw = raw[index[start:stop]] if index is not None else raw[start:stop]
            w = to_f32(raw, ad.file.tensors[key].dtype)
        else:
            w = self.ckpt.rows_f32(name, start, stop, index)
        m = ad.modules.get(name) if ad is not None else None
        if m is not None:
            b = ad.b(m)
            b = b[index[start:stop]] if index is not None else b[start:stop]
            w += np.float32(m.scale) * (b @ ad.a(m))
            mag = ad.magnitude(m)
            if mag is not None:  # DoRA: rescale each output row to its learned magnitude
                mag = mag[index[start:stop]] if index is not None else mag[start:stop]
                w *= (mag / np.linalg.norm(w, axis=1))[:, None]
        return w

    def release(self, name: str, start: int = 0, stop: int | None = None) -> None:
        self.ckpt.release(name, start, stop)


def row_blocks(n_rows: int, row_elements: int, budget: int = CHUNK_ELEMENTS):
    step = max(1, budget // max(row_elements, 1))
    for start in range(0, n_rows, step):
        yield start, min(n_rows, start + step)


# --- merged safetensors (ollama-ft merge) ---------------------------------------------------
COPY_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer.model",
              "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
              "model.safetensors.index.json")


def _header_bytes(entries: list[tuple[str, str, tuple[int, ...], int]]) -> tuple[bytes, list[int]]:
    header, offset, sizes = {"__metadata__": {"format": "pt"}}, 0, []
    for name, dtype, shape, nbytes in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
        sizes.append(nbytes)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw, sizes


def _cast_rows(w: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return f32_to_bf16_bits(w)
    return w.astype(ST_DTYPES[dtype])


def write_merged_safetensors(model: MergedModel, out_dir: Path, log=print) -> list[Path]:
    """Write the merged checkpoint into a temporary folder, renamed to `out_dir` when complete.

    Shards, tensor names and dtypes mirror the base; config and tokenizer files are copied.
    """
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    written = []
    try:
        for sf in model.ckpt.files:
            names = list(sf.tensors)
            entries = [(n, sf.tensors[n].dtype, sf.tensors[n].shape,
                        sf.tensors[n].end - sf.tensors[n].begin) for n in names]
            head, _ = _header_bytes(entries)
            with open(tmp / sf.path.name, "wb") as f:
                f.write(head)
                for n in names:
                    t = sf.tensors[n]
                    if not model.has_delta(n) or t.dtype not in FLOAT_DTYPES:
                        for s, e in row_blocks(t.rows, t.row_elements):
                            model.ckpt.raw_rows(n, s, e).tofile(f)
                            model.release(n, s, e)
                        continue
                    for s, e in row_blocks(t.rows, t.row_elements):
                        _cast_rows(model.rows(n, s, e), t.dtype).tofile(f)
                        model.release(n, s, e)
                f.flush()
                os.fsync(f.fileno())
            written.append(out_dir / sf.path.name)
            log(f"  merged {sf.path.name} ({len(names)} tensors)")
        for name in COPY_FILES:
            src = model.ckpt.dir / name
            if src.is_file():
                shutil.copyfile(src, tmp / name)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return written
