"""GGUF types: which ones exist, how big they get, and llama.cpp's quantizer for the rest.

F32, F16, BF16 and Q8_0 are written directly by gguf.py from the merged fp32 weights. Every
other type (the K-quants, Q4_0, Q5_0, ...) goes through llama.cpp's own quantizer
(`llama_model_quantize` via llama-cpp-python), all cores, from one F16 intermediate.
"""

from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ollama_ft.export.errors import QuantizeError, QuantTypeError


@dataclass(frozen=True)
class QuantType:
    name: str  # lower case, as in model-<name>.gguf
    direct: bool  # written by gguf.py (True) or by llama.cpp's quantizer
    bits: float  # bits per weight of a 2-D tensor, rounded up (disk estimates)

    @property
    def file_type_name(self) -> str:
        """llama.cpp's llama_ftype name (gguf.LlamaFileType): ALL_F32, MOSTLY_Q4_K_M, ..."""
        return "ALL_F32" if self.name == "f32" else f"MOSTLY_{self.name.upper()}"

    @property
    def file_type(self) -> int:
        """general.file_type of a GGUF of this type (and llama.cpp's quantizer's ftype)."""
        import gguf

        return int(gguf.LlamaFileType[self.file_type_name])

    @property
    def gguf_type(self) -> str:
        """The tensor type gguf.py writes for a direct type (F32, F16, BF16, Q8_0)."""
        return self.name.upper()


# The one table of GGUF output types: gguf.py writes the direct ones, file types come from here.
QUANT_TYPES: dict[str, QuantType] = {q.name: q for q in (
    QuantType("f32", True, 32), QuantType("f16", True, 16), QuantType("bf16", True, 16),
    QuantType("q8_0", True, 8.5),
    QuantType("q6_k", False, 6.6), QuantType("q5_k_m", False, 5.9), QuantType("q5_k_s", False, 5.6),
    QuantType("q4_k_m", False, 5.1), QuantType("q4_k_s", False, 4.7),
    QuantType("q3_k_l", False, 4.4), QuantType("q3_k_m", False, 4.1), QuantType("q3_k_s", False, 3.7),
    QuantType("q2_k", False, 3.4),
    QuantType("q5_0", False, 5.5), QuantType("q5_1", False, 6.0), QuantType("q4_0", False, 4.5),
    QuantType("q4_1", False, 5.0), QuantType("iq4_nl", False, 4.5), QuantType("iq4_xs", False, 4.3),
)}
DEFAULT_QUANT = "q4_k_m"


def parse_quants(spec: str | list[str] | tuple[str, ...] | None) -> list[QuantType]:
    """'q4_k_m,Q8_0' -> [QuantType, ...] (order kept, duplicates dropped); unknown -> error."""
    if spec is None or spec == "":
        spec = DEFAULT_QUANT
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[QuantType] = []
    for raw in parts:
        name = str(raw).strip().lower().replace("-", "_")
        if not name:
            continue
        q = QUANT_TYPES.get(name)
        if q is None:
            raise QuantTypeError(f"--quant: unknown GGUF type {str(raw).strip()!r}; valid types: "
                                 f"{', '.join(QUANT_TYPES)}")
        if q not in out:
            out.append(q)
    if not out:
        raise QuantTypeError(f"--quant: no type given; valid types: {', '.join(QUANT_TYPES)}")
    return out


def estimate_bytes(q: QuantType, n_matrix: int, n_vector: int, n_vocab: int = 0) -> int:
    """A generous size estimate of one GGUF: matrices at q.bits, vectors F32, token list.

    Small or odd-shaped matrices fall back to bigger types in llama.cpp, hence the margin.
    """
    bits = q.bits if q.direct else max(q.bits * 1.15, min(q.bits + 2.0, 8.5))
    return int(n_matrix * bits / 8 + n_vector * 4 + n_vocab * 64 + 16 * 2**20)


def _collecting_logger(lines: list[str]):
    import llama_cpp

    state = {"keep": False}

    @llama_cpp.llama_log_callback
    def callback(level, text, user_data):
        if level in (2, 3):  # warn, error
            state["keep"] = True
        elif level != 5:  # 5 continues the previous line
            state["keep"] = False
        if state["keep"]:
            lines.append(text.decode("utf-8", errors="replace"))

    return callback


def llama_quantize(src: Path, dst: Path, q: QuantType, nthread: int | None = None) -> None:
    """llama.cpp's quantizer: src (an F16/F32 GGUF) -> dst as type q. Raises QuantizeError."""
    import llama_cpp

    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = nthread or os.cpu_count() or 1
    params.ftype = q.file_type
    lines: list[str] = []
    callback = _collecting_logger(lines)
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode("utf-8"), str(dst).encode("utf-8"),
                                            ctypes.byref(params))
    finally:
        restore = getattr(getattr(llama_cpp, "_logger", None), "llama_log_callback", None)
        if restore is not None:
            llama_cpp.llama_log_set(restore, ctypes.c_void_p(0))
    if rc != 0 or not Path(dst).is_file():
        detail = "".join(lines).strip().splitlines()[-3:]
        raise QuantizeError(f"llama.cpp could not quantize {src} to {q.name} (code {rc})"
                            + (f": {' '.join(detail)}" if detail else ""))
