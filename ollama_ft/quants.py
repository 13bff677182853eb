"""GGUF output types: the one table, the one default and the one parser.

config (checking --quant before training), export (what to write and how), the Modelfile and
register (which file is served), eval and the CLI's help all read this module; the Open WebUI
pipe, a single file installed into Open WebUI, keeps a copy that a test holds equal.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ollama_ft.errors import QuantTypeError


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


def quant_names(quant: str | Iterable[str]) -> list[str]:
    """"q4_k_m,q8_0" or a list -> the names as given, empty ones dropped (no checking)."""
    return [q.strip() for q in (quant.split(",") if isinstance(quant, str) else quant) if q.strip()]


def quants_help() -> str:
    """The --quant help text: the default and every type."""
    return (f"GGUF type(s), comma-separated (default {DEFAULT_QUANT}): "
            f"{', '.join(QUANT_TYPES)}")


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
