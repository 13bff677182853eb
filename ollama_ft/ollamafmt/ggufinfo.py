"""What the bridge reads from a GGUF: architecture, type, sizes, metadata for /api/show."""

from __future__ import annotations

import functools
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
    tensors: list = field(default_factory=list)  # [{name, shape, type}] in file order

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


def _type_name(code: int) -> str:
    import gguf

    try:
        return gguf.GGMLQuantizationType(code).name
    except ValueError:
        return f"type-{code}"


def is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
MAX_LISTED_ARRAY = 16


class _Cursor:
    def __init__(self, f):
        self.f = f

    def unpack(self, fmt: str):
        import struct

        size = struct.calcsize(fmt)
        data = self.f.read(size)
        if len(data) != size:
            raise NotGGUF("the GGUF file is truncated")
        return struct.unpack(fmt, data)[0]

    def string(self, keep: bool = True):
        n = self.unpack("<Q")
        if n > 1 << 30:
            raise NotGGUF("the GGUF file is damaged (impossible string length)")
        if not keep:
            self.f.seek(n, 1)
            return None
        return self.f.read(n).decode("utf-8", errors="replace")

    def value(self, vtype: int, keep: bool = True):
        if vtype == 6:  # float32: its shortest decimal, as Go prints a float32
            import numpy as np

            return float(str(np.float32(self.unpack("<f"))))
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string(keep)
        if vtype == _ARRAY:
            etype, count = self.unpack("<I"), self.unpack("<Q")
            small = keep and count <= MAX_LISTED_ARRAY
            if etype in _SCALARS and not small:
                import struct

                self.f.seek(struct.calcsize(_SCALARS[etype]) * count, 1)
                return None
            items = [self.value(etype, small) for _ in range(count)]
            return items if small else None  # long arrays (the vocabulary) are left out
        raise NotGGUF(f"the GGUF file is damaged (unknown value type {vtype})")


def read_info(path: str | Path) -> GGUFInfo:
    """Header and tensor table only, read directly: fast even with a 150k-token vocabulary."""
    path = Path(path)
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise NotGGUF("supplied file was not in GGUF format")
        c = _Cursor(f)
        version = c.unpack("<I")
        if version < 2:
            raise NotGGUF(f"GGUF version {version} is too old")
        n_tensors, n_kv = c.unpack("<Q"), c.unpack("<Q")
        meta = {}
        for _ in range(n_kv):
            key = c.string()
            meta[key] = c.value(c.unpack("<I"))
        count, tensors = 0, []
        for _ in range(n_tensors):
            name = c.string()
            dims = [c.unpack("<Q") for _ in range(c.unpack("<I"))]
            tensors.append({"name": name, "shape": dims, "type": _type_name(c.unpack("<I"))})
            c.unpack("<Q")
            n = 1
            for d in dims:
                n *= d
            count += n
    arch = meta.get("general.architecture") or "unknown"
    return GGUFInfo(architecture=arch, general_type=meta.get("general.type") or "model",
                    file_type=file_type_name(meta.get("general.file_type")),
                    parameter_count=count, context_length=meta.get(f"{arch}.context_length"),
                    metadata=meta, tensors=tensors)


def token_texts(path: str | Path, ids: list[int]) -> dict[int, str]:
    """The texts of the given token ids (tokenizer.ggml.tokens), read without the rest."""
    wanted, found = set(ids), {}
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise NotGGUF("supplied file was not in GGUF format")
        c = _Cursor(f)
        c.unpack("<I")
        c.unpack("<Q")
        for _ in range(c.unpack("<Q")):
            key, vtype = c.string(), c.unpack("<I")
            if key == "tokenizer.ggml.tokens" and vtype == _ARRAY:
                c.unpack("<I")
                for i in range(c.unpack("<Q")):
                    text = c.string(keep=i in wanted)
                    if text is not None:
                        found[i] = text
                return found
            c.value(vtype, keep=False)
    return found


@functools.lru_cache(maxsize=64)
def cached_info(path: Path) -> GGUFInfo:
    """read_info for store blobs and exported files, read once: they never change."""
    return read_info(path)


def chat_template(path: Path | None) -> str | None:
    """The GGUF's tokenizer.chat_template, None when absent or unreadable."""
    if path is None:
        return None
    try:
        return cached_info(Path(path)).metadata.get("tokenizer.chat_template") or None
    except (OSError, NotGGUF):
        return None
