"""What the bridge reads from a GGUF: architecture, type, sizes, metadata for /api/show."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ollama_ft.errors import OllamaError

GGUF_MAGIC = b"GGUF"


class NotGGUF(OllamaError):
    pass


@dataclass
class GGUFInfo:
    architecture: str
    general_type: str  # model | adapter
    file_type: str  # F16, Q4_K_M, ...
    parameter_count: int
    context_length: int | None
    metadata: dict = field(default_factory=dict)  # scalar keys (long arrays as None)

    @property
    def parameter_size(self) -> str:
        return human_number(self.parameter_count)


def human_number(n: int) -> str:
    """Ollama's style: 1.8B, 494.03M, 7B."""
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            x = n / div
            if x == int(x):
                return f"{int(x)}{unit}"
            return f"{x:.1f}{unit}" if unit == "B" else f"{x:.2f}{unit}"
    return str(n)


def file_type_name(code: int | None) -> str:
    if code is None:
        return "unknown"
    import gguf

    try:
        name = gguf.LlamaFileType(code).name
    except ValueError:
        return f"type-{code}"
    return name.replace("MOSTLY_", "").replace("ALL_", "")


def is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def read_info(path: str | Path) -> GGUFInfo:
    path = Path(path)
    if not is_gguf(path):
        raise NotGGUF("supplied file was not in GGUF format")
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises several types on a damaged file
        raise NotGGUF(f"the GGUF file could not be read: {e}") from None
    meta = {}
    for name, fld in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        try:
            value = fld.contents()
        except Exception:  # pragma: no cover - exotic types
            value = None
        if isinstance(value, list) and len(value) > 16:
            value = None  # Ollama leaves long arrays (the vocabulary) out unless verbose
        meta[name] = value
    arch = meta.get("general.architecture") or "unknown"
    count = sum(int(t.n_elements) for t in reader.tensors)
    return GGUFInfo(architecture=arch, general_type=meta.get("general.type") or "model",
                    file_type=file_type_name(meta.get("general.file_type")),
                    parameter_count=count, context_length=meta.get(f"{arch}.context_length"),
                    metadata=meta)
