"""Errors a user can cause. The CLI prints them without a traceback and exits non-zero.

Every message says what was wrong, where (file:line, field, tensor name) and what to do.
"""


class OllamaFtError(Exception):
    """Base class for user-facing errors."""

    exit_code = 2


class ConfigError(OllamaFtError):
    """A bad option, config key or value."""


class DataError(OllamaFtError):
    """A training data file that cannot be trained on."""


class BaseModelError(OllamaFtError):
    """A base checkpoint that cannot be resolved, downloaded or loaded."""


class TrainingError(OllamaFtError):
    """Training cannot start or continue (device, resume, memory)."""


class ExportError(OllamaFtError):
    """Merging or converting to GGUF failed because of the inputs."""


class RunDirError(ExportError):
    """A run directory without what a stage needs (run.yaml, report.json, adapter/, its base)."""


class QuantTypeError(ExportError):
    """An unknown or unsupported --quant type."""


class OllamaError(OllamaFtError):
    """Registration or the Ollama API failed."""
