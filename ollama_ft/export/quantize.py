"""GGUF types: which ones exist, how big they get, and llama.cpp's quantizer for the rest.

F32, F16, BF16 and Q8_0 are written directly by gguf.py from the merged fp32 weights. Every
other type (the K-quants, Q4_0, Q5_0, ...) is llama.cpp's: from one F16 intermediate, a few
rows at a time, so that memory stays flat however large the model.

`llama_model_quantize` itself maps its input and converts a whole tensor to fp32 before
quantizing it: 1.8 GB resident at 1.5B parameters (the 233M-entry embedding), more at 7B.
So llama.cpp is asked two things separately. Which type each tensor gets (its mixtures: Q4_K_M
keeps half the attn_v and ffn_down layers and the output at Q6_K, falls back where a row does
not divide into blocks, per architecture): answered by running `llama_model_quantize` on a
*plan* GGUF with the same metadata and tensor names as the input but two rows per tensor (the
choice depends on names, row length and the model's hyperparameters, never on the data). And
the quantization itself: ggml's `ggml_quantize_chunk`, called on blocks of rows read from the
input with pread, on a few threads. The output is the file llama.cpp would write (its metadata
bytes, its tensor order and offsets, the same quantized rows); tests compare them byte for byte.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import re
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ollama_ft.export.errors import QuantizeError
from ollama_ft.quants import QuantType


def estimate_bytes(q: QuantType, n_matrix: int, n_vector: int, n_vocab: int = 0) -> int:
    """A generous size estimate of one GGUF: matrices at q.bits, vectors F32, token list.

    Small or odd-shaped matrices fall back to bigger types in llama.cpp, hence the margin.
    """
    bits = q.bits if q.direct else max(q.bits * 1.15, min(q.bits + 2.0, 8.5))
    return int(n_matrix * bits / 8 + n_vector * 4 + n_vocab * 64 + 16 * 2**20)


# ggml_log_level as the llama.cpp inside llama-cpp-python numbers it (ggml.h: NONE, DEBUG, INFO,
# WARN, ERROR, CONT; the comment in llama-cpp-python's _logger.py has an older order). A failed
# quantization logs the whole metadata dump at INFO and its reason at ERROR, e.g.
# "llama_model_quantize: failed to quantize: key not found in model:
# deepseek2.attention.q_lora_rank".
GGML_LOG_WARN, GGML_LOG_ERROR, GGML_LOG_CONT = 3, 4, 5
_REASON_WORDS = re.compile(r"error|fail|exception|not found|invalid|unsupported|cannot|unable",
                           re.IGNORECASE)
_METADATA_DUMP = re.compile(r"llama_model_loader: - (kv|type) ")


def _collecting_logger(records: list[tuple[int, str]]):
    """A llama.cpp log callback that appends (level, text) to records."""
    import llama_cpp

    @llama_cpp.llama_log_callback
    def callback(level, text, user_data):
        records.append((int(level), text.decode("utf-8", errors="replace")))

    return callback


def failure_reason(records: list[tuple[int, str]], keep: int = 3) -> list[str]:
    """What llama.cpp's log says went wrong: its ERROR lines; failing those (a build that numbers
    levels differently), lines that read like a reason outside the metadata dump; then its
    warnings; then the log's last lines. At most `keep` lines, the last ones."""
    joined: list[list] = []  # a CONT record continues the one before it
    for level, text in records:
        if level == GGML_LOG_CONT and joined:
            joined[-1][1] += text
        else:
            joined.append([level, text])
    lines = [(level, line.strip()) for level, text in joined for line in text.splitlines()
             if line.strip()]
    for wanted in (lambda level, line: level == GGML_LOG_ERROR,
                   lambda level, line: (_REASON_WORDS.search(line)
                                        and not _METADATA_DUMP.match(line)),
                   lambda level, line: level == GGML_LOG_WARN):
        found = [line for level, line in lines if wanted(level, line)]
        if found:
            return found[-keep:]
    return [line for _, line in lines[-keep:]]


def _quantize_whole(src: Path, dst: Path, q: QuantType, nthread: int | None = None,
                    shown_as: Path | None = None) -> None:
    """llama.cpp's `llama_model_quantize`: src -> dst as type q (whole tensors in memory: used
    here on plan GGUFs only). Raises QuantizeError with llama.cpp's reason, naming `shown_as`
    (the file the plan stands for) or src."""
    import llama_cpp

    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = nthread or os.cpu_count() or 1
    params.ftype = q.file_type
    records: list[tuple[int, str]] = []
    callback = _collecting_logger(records)
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode("utf-8"), str(dst).encode("utf-8"),
                                            ctypes.byref(params))
    finally:
        restore = getattr(getattr(llama_cpp, "_logger", None), "llama_log_callback", None)
        if restore is not None:
            llama_cpp.llama_log_set(restore, ctypes.c_void_p(0))
    if rc != 0 or not Path(dst).is_file():
        detail = failure_reason(records)
        raise QuantizeError(f"llama.cpp could not quantize {shown_as or src} to {q.name} "
                            f"(code {rc})" + (f": {' '.join(detail)}" if detail else ""))


# --- GGUF layout: the header, read without loading the metadata ----------------------------
GGUF_MAGIC = b"GGUF"
# GGUF metadata value types -> bytes of a scalar (8: string, 9: array)
_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY, _UINT32 = 8, 9, 4
DEFAULT_ALIGNMENT = 32
GGML_F32, GGML_F16, GGML_BF16 = 0, 1, 30


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order: shape[0] is the row length
    type: int  # ggml_type
    offset: int  # from the start of the data section

    @property
    def rows(self) -> int:
        return math.prod(self.shape[1:])


@dataclass
class GgufLayout:
    kv_end: int  # where the metadata ends and the tensor infos start
    alignment: int
    tensors: list[TensorInfo]
    data_start: int


def read_layout(path: Path) -> GgufLayout:
    """Tensor infos, alignment and section offsets of a GGUF; the metadata values are skipped."""
    import mmap

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        if m[:4] != GGUF_MAGIC:
            raise QuantizeError(f"{path}: not a GGUF file")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", m, 4)
        if version < 2:
            raise QuantizeError(f"{path}: GGUF version {version} is too old to quantize")
        pos, alignment = 24, DEFAULT_ALIGNMENT

        def string(pos):
            (n,) = struct.unpack_from("<Q", m, pos)
            return m[pos + 8:pos + 8 + n].decode("utf-8"), pos + 8 + n

        def skip(pos, vtype):
            if vtype == _STRING:
                return pos + 8 + struct.unpack_from("<Q", m, pos)[0]
            if vtype == _ARRAY:
                sub, count = struct.unpack_from("<IQ", m, pos)
                pos += 12
                if sub in _SCALAR_BYTES:
                    return pos + count * _SCALAR_BYTES[sub]
                for _ in range(count):
                    pos = skip(pos, sub)
                return pos
            return pos + _SCALAR_BYTES[vtype]

        for _ in range(n_kv):
            key, pos = string(pos)
            (vtype,) = struct.unpack_from("<I", m, pos)
            if key == "general.alignment" and vtype == _UINT32:
                (alignment,) = struct.unpack_from("<I", m, pos + 4)
            pos = skip(pos + 4, vtype)
        kv_end = pos
        tensors = []
        for _ in range(n_tensors):
            name, pos = string(pos)
            (n_dims,) = struct.unpack_from("<I", m, pos)
            shape = struct.unpack_from(f"<{n_dims}Q", m, pos + 4)
            ttype, offset = struct.unpack_from("<IQ", m, pos + 4 + 8 * n_dims)
            pos += 4 + 8 * n_dims + 12
            tensors.append(TensorInfo(name, tuple(shape), ttype, offset))
        return GgufLayout(kv_end, alignment, tensors, _pad(pos, alignment))


def _pad(n: int, alignment: int) -> int:
    return n + (-n % alignment)


def _tensor_infos(tensors: list[TensorInfo]) -> bytes:
    out = bytearray()
    for t in tensors:
        name = t.name.encode("utf-8")
        out += struct.pack("<Q", len(name)) + name
        # as ggml writes them: trailing dimensions of 1 are not dimensions
        dims = max([1] + [i + 1 for i, n in enumerate(t.shape) if n > 1])
        out += struct.pack(f"<I{dims}Q", dims, *t.shape[:dims]) + struct.pack("<IQ", t.type, t.offset)
    return bytes(out)


def _laid_out(tensors: list[tuple[str, tuple[int, ...], int]], alignment: int, ggml):
    """TensorInfos with offsets as llama.cpp assigns them: each tensor aligned."""
    out, offset = [], 0
    for name, shape, ttype in tensors:
        out.append(TensorInfo(name, shape, ttype, offset))
        offset = _pad(offset + ggml.nbytes(ttype, shape), alignment)
    return out, offset


# --- ggml: the quantization functions --------------------------------------------------------
class _Ggml:
    """ggml-base from llama-cpp-python: row sizes, ggml_quantize_chunk, row validation."""

    def __init__(self):
        import llama_cpp
        from llama_cpp._ctypes_extensions import load_shared_library

        lib = load_shared_library("ggml-base", Path(llama_cpp.__file__).parent / "lib")
        i64, sz = ctypes.c_int64, ctypes.c_size_t
        self.row_size = lib.ggml_row_size
        self.row_size.argtypes, self.row_size.restype = [ctypes.c_int, i64], sz
        self.quantize_chunk = lib.ggml_quantize_chunk
        self.quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, i64, i64,
                                        i64, ctypes.c_void_p]
        self.quantize_chunk.restype = sz
        self.validate = lib.ggml_validate_row_data
        self.validate.argtypes, self.validate.restype = [ctypes.c_int, ctypes.c_void_p, sz], ctypes.c_bool
        self.to_f32 = {}  # ggml_type -> its row converter to fp32 (SIMD, outside the GIL)
        for ttype, fn in ((GGML_F16, "ggml_fp16_to_fp32_row"), (GGML_BF16, "ggml_bf16_to_fp32_row")):
            f = getattr(lib, fn)
            f.argtypes, f.restype = [ctypes.c_void_p, ctypes.c_void_p, i64], None
            self.to_f32[ttype] = f

    def nbytes(self, ttype: int, shape: tuple[int, ...]) -> int:
        return self.row_size(ttype, shape[0]) * math.prod(shape[1:])


_GGML: _Ggml | None = None


def _ggml() -> _Ggml:
    global _GGML
    if _GGML is None:
        _GGML = _Ggml()
    return _GGML


# --- quantizing in row blocks ----------------------------------------------------------------
ROW_BLOCK_ELEMENTS = 2 * 1024 * 1024  # ~8 MiB of fp32 per block
COPY_BYTES = 32 * 1024 * 1024


def llama_quantize(src: Path, dst: Path, q: QuantType, nthread: int | None = None) -> None:
    """llama.cpp's quantization of src (an F32/F16/BF16 GGUF) to dst as type q, in row blocks
    (see the module docstring). Raises QuantizeError."""
    src, dst = Path(src), Path(dst)
    ggml = _ggml()
    layout = read_layout(src)
    for t in layout.tensors:
        if t.type not in (GGML_F32, GGML_F16, GGML_BF16):
            raise QuantizeError(f"{src}: tensor {t.name} is of ggml type {t.type}; quantizing "
                                "reads F32, F16 or BF16 GGUFs only")
    plan = type_plan(src, layout, q, ggml)
    by_name = {t.name: t for t in layout.tensors}
    infos, data_bytes = _laid_out([(p.name, by_name[p.name].shape, p.type) for p in plan.tensors],
                                  plan.alignment, ggml)
    with open(plan.path, "rb") as f:
        prefix = f.read(plan.kv_end)
    header = prefix + _tensor_infos(infos)
    header += b"\0" * (-len(header) % plan.alignment)
    threads = max(1, nthread or os.cpu_count() or 1)
    try:
        with open(src, "rb") as fin, open(dst, "wb") as fout:
            fout.write(header)
            blocks = _Blocks(fin.fileno(), layout.data_start, threads, ggml)
            try:
                for info in infos:
                    written = 0
                    for block in blocks.tensor(by_name[info.name], info.type):
                        fout.write(block)
                        written += block.nbytes if hasattr(block, "nbytes") else len(block)
                    fout.write(b"\0" * (_pad(written, plan.alignment) - written))
            finally:
                blocks.close()
            fout.flush()
            os.fsync(fout.fileno())
    finally:
        Path(plan.path).unlink(missing_ok=True)
    if dst.stat().st_size != len(header) + data_bytes:  # pragma: no cover - a layout bug
        raise QuantizeError(f"{dst}: wrote {dst.stat().st_size} bytes, planned "
                            f"{len(header) + data_bytes}")


@dataclass
class TypePlan:
    path: Path  # llama.cpp's output for the plan GGUF: its metadata is the output's metadata
    kv_end: int
    alignment: int
    tensors: list[TensorInfo]  # llama.cpp's order, each with the type it chose


def type_plan(src: Path, layout: GgufLayout, q: QuantType, ggml=None) -> TypePlan:
    """llama.cpp's choice of type per tensor for `q`, from a plan GGUF: src's metadata bytes and
    tensor names with at most two rows per tensor (zeros), quantized by llama_model_quantize."""
    ggml = ggml or _ggml()
    small = [(t.name, t.shape[:1] + (min(t.shape[1], 2),) + t.shape[2:] if len(t.shape) > 1
              else t.shape, t.type) for t in layout.tensors]
    infos, data_bytes = _laid_out(small, layout.alignment, ggml)
    fd, plan_in = tempfile.mkstemp(prefix="ollama-ft-plan-", suffix=".gguf")
    plan_out = Path(plan_in).with_name(Path(plan_in).stem + f"-{q.name}.gguf")
    try:
        with os.fdopen(fd, "wb") as f, open(src, "rb") as fin:
            f.write(fin.read(layout.kv_end))
            head = _tensor_infos(infos)
            f.write(head + b"\0" * (-(layout.kv_end + len(head)) % layout.alignment))
            f.truncate(f.tell() + data_bytes)  # the data: zeros
        _quantize_whole(Path(plan_in), plan_out, q, 1, shown_as=src)
        out = read_layout(plan_out)
    except BaseException:
        plan_out.unlink(missing_ok=True)
        raise
    finally:
        Path(plan_in).unlink(missing_ok=True)
    return TypePlan(plan_out, out.kv_end, out.alignment, out.tensors)


class _Blocks:
    """The output bytes of each tensor, block by block: rows read with pread, converted to fp32
    and quantized on a thread pool (ggml and numpy release the GIL), handed out in order. At
    most 2 * threads + 1 blocks are in flight, which bounds memory."""

    def __init__(self, fd: int, data_start: int, threads: int, ggml: _Ggml):
        from concurrent.futures import ThreadPoolExecutor

        self.fd, self.data_start, self.ggml = fd, data_start, ggml
        self.lookahead = 2 * threads + 1
        self.pool = ThreadPoolExecutor(threads) if threads > 1 else None

    def tensor(self, src: TensorInfo, out_type: int):
        from collections import deque

        start = self.data_start + src.offset
        if out_type == src.type:  # llama.cpp keeps it as it is: copy the bytes
            size = self.ggml.nbytes(src.type, src.shape)
            tasks = [(self._copy, start + o, min(COPY_BYTES, size - o)) for o in range(0, size, COPY_BYTES)]
        else:
            n = src.shape[0]
            step = max(1, ROW_BLOCK_ELEMENTS // n)
            row_bytes = self.ggml.row_size(src.type, n)
            tasks = [(self._quantize, src, out_type, start + r * row_bytes, min(step, src.rows - r))
                     for r in range(0, src.rows, step)]
        pending, todo = deque(), iter(tasks)
        while True:
            while len(pending) < self.lookahead:
                task = next(todo, None)
                if task is None:
                    break
                fn, *args = task
                pending.append(self.pool.submit(fn, *args) if self.pool else _Done(fn(*args)))
            if not pending:
                return
            yield pending.popleft().result()

    def _read(self, pos: int, size: int) -> bytes:
        data = os.pread(self.fd, size, pos)
        if len(data) != size:
            raise QuantizeError(f"the F16 intermediate ends early (wanted {size} bytes at {pos})")
        return data

    def _copy(self, pos: int, size: int) -> bytes:
        return self._read(pos, size)

    def _quantize(self, src: TensorInfo, out_type: int, pos: int, nrows: int) -> bytes:
        import numpy as np

        n = src.shape[0]
        raw = np.frombuffer(self._read(pos, self.ggml.row_size(src.type, n) * nrows), np.uint8)
        if not self.ggml.validate(src.type, raw.ctypes.data, raw.nbytes):  # NaN or inf
            raise QuantizeError(f"tensor {src.name}: the merged weights hold NaN or infinite "
                                "values; the adapter (or the base) is damaged: train again or "
                                "export an earlier checkpoint")
        if src.type == GGML_F32:
            rows = raw.view(np.float32)
        else:
            rows = np.empty(n * nrows, np.float32)
            self.ggml.to_f32[src.type](raw.ctypes.data, rows.ctypes.data, n * nrows)
        out = np.empty(self.ggml.row_size(out_type, n) * nrows, np.uint8)
        size = self.ggml.quantize_chunk(out_type, rows.ctypes.data, out.ctypes.data, 0, nrows, n,
                                        None)
        if not self.ggml.validate(out_type, out.ctypes.data, size):  # as llama.cpp checks
            raise QuantizeError(f"tensor {src.name}: llama.cpp's {out_type} rows failed "
                                "validation")
        return out[:size]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


class _Done:
    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value
