"""What can go wrong in the export stage because of its inputs.

Every class is an `ExportError` (so the CLI prints it without a traceback); the
subclasses let callers and tests tell the causes apart.
"""

from __future__ import annotations

from ollama_ft.errors import ExportError


class CheckpointError(ExportError):
    """A base checkpoint file is missing, truncated or not valid safetensors."""


class AdapterError(ExportError):
    """The LoRA adapter is missing, malformed, or does not fit the base."""


class UnsupportedModelError(ExportError):
    """An architecture, tensor or setting the GGUF writer has no table entry for."""


class TokenizerError(ExportError):
    """A tokenizer llama.cpp would not reproduce (unknown pre-tokenizer, not BPE, ...)."""


class DiskSpaceError(ExportError):
    """Not enough free disk space for the outputs."""


class QuantizeError(ExportError):
    """llama.cpp's quantizer failed."""
