"""RunConfig: every setting of a run, from a YAML file and flags (flags win), validated.

The resolved config (every default filled in) is written to `RUN/run.yaml`; the same keys
are accepted by `--config`, and by the bridge service's jobs API.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ollama_ft.errors import ConfigError

SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts",
              "polynomial", "inverse_sqrt")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
DEVICES = ("auto", "cpu", "cuda", "mps")
REPORT_TARGETS = ("none", "tensorboard", "mlflow", "wandb")


def report_targets(value: str | None) -> list[str]:
    """"tensorboard,mlflow" -> ["tensorboard", "mlflow"]; "" or None -> ["none"]."""
    out = [v.strip().lower() for v in (value or "none").split(",") if v.strip()]
    return out or ["none"]


@dataclass
class RunConfig:
    name: str | None = None
    base: str | None = None
    data: str | None = None
    output_dir: str | None = None
    # data
    format: str | None = None
    chat_format: str | None = None
    eval_split: float = 0.0
    eval_data: str | None = None
    max_len: int = 2048
    packing: bool = True
    # optimisation
    epochs: float = 3.0
    max_steps: int = -1
    lr: float = 2e-4
    batch_size: int = 4
    grad_accum: int = 1
    warmup: float = 0.03
    scheduler: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 42
    gradient_checkpointing: bool = True  # the memory of one layer's activations; costs ~20%
    precision: str = "auto"
    device: str = "auto"
    # LoRA
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: list[str] | None = None
    dora: bool = False
    rslora: bool = False
    load_in_4bit: bool = False
    # bookkeeping
    logging_steps: int = 5
    save_steps: int = 100
    save_total_limit: int = 3
    eval_steps: int | None = None
    early_stopping_patience: int | None = 3
    report_to: str = "tensorboard"  # comma-separated: tensorboard, mlflow, wandb; or none
    resume: bool = False
    # later stages
    quant: str = "q4_k_m"
    merged: bool = False  # an `ollama:NAME` base: register base + LoRA merged, not an ADAPTER
    export: bool = True
    register: bool = True
    # trust
    allow_pickle: bool = False
    trust_remote_code: bool = False
    extra: dict = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------------------------
    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir or Path("runs") / (self.name or "run"))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("extra")
        return d

    def validate(self, where: str = "config") -> "RunConfig":
        for key in ("name", "base", "data"):
            if not getattr(self, key):
                raise ConfigError(f"{where}: '{key}' is required (--{key.replace('_', '-')})")
        _check(where, "eval_split", 0.0 <= self.eval_split < 1.0, "a fraction in [0, 1)")
        if self.eval_split and self.eval_data:
            raise ConfigError(f"{where}: use either eval_split or eval_data, not both")
        for key in ("max_len", "batch_size", "grad_accum", "lora_r", "lora_alpha",
                    "logging_steps", "save_steps", "save_total_limit"):
            _check(where, key, getattr(self, key) > 0, "a positive integer")
        _check(where, "epochs", self.epochs > 0 or self.max_steps > 0, "positive (or set max_steps)")
        _check(where, "lr", 0 < self.lr < 1, "a learning rate in (0, 1), e.g. 2e-4")
        _check(where, "lora_dropout", 0 <= self.lora_dropout < 1, "in [0, 1)")
        _check(where, "warmup", self.warmup >= 0, "a ratio < 1 or a number of steps >= 1")
        _check(where, "scheduler", self.scheduler in SCHEDULERS, f"one of {', '.join(SCHEDULERS)}")
        _check(where, "precision", self.precision in PRECISIONS, f"one of {', '.join(PRECISIONS)}")
        _check(where, "device", self.device in DEVICES, f"one of {', '.join(DEVICES)}")
        reports = report_targets(self.report_to)
        _check(where, "report_to", all(r in REPORT_TARGETS for r in reports) and (
            "none" not in reports or len(reports) == 1),
            f"'none' or a comma-separated list of {', '.join(REPORT_TARGETS[1:])}")
        if self.export:
            from ollama_ft.export.quantize import parse_quants

            parse_quants(self.quant)  # a bad --quant fails now, not after training
        if self.name and not _valid_name(self.name):
            raise ConfigError(f"{where}: name {self.name!r} must start with a letter or digit and "
                              "hold only letters, digits, '-', '_' and '.'")
        return self


def _valid_name(name: str) -> bool:
    import re

    return bool(re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,79}", name))


def _check(where, key, ok, what):
    if not ok:
        raise ConfigError(f"{where}: '{key}' must be {what}")


FIELDS = {f.name: f for f in dataclasses.fields(RunConfig) if f.name != "extra"}


def _coerce(key: str, value: Any, where: str) -> Any:
    """Check a YAML/JSON value against the field's type; ints may be given for floats."""
    if value is None:
        return None
    default = FIELDS[key].default
    typ = FIELDS[key].type
    try:
        if "bool" in typ:
            if not isinstance(value, bool):
                raise TypeError
            return value
        if "list" in typ:
            if isinstance(value, str):
                return [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise TypeError
            return value
        if typ.startswith("int") or isinstance(default, int) and not isinstance(default, bool):
            if isinstance(value, bool) or not isinstance(value, int):
                if isinstance(value, float) and value.is_integer():
                    return int(value)
                raise TypeError
            return value
        if typ.startswith("float"):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                if isinstance(value, str):
                    return float(value)  # YAML reads 2e-4 as a string
                raise TypeError
            return float(value)
        if not isinstance(value, (str, int, float)):
            raise TypeError
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: '{key}' has the wrong type ({type(value).__name__} "
                          f"{value!r}); expected {typ}") from None


def from_mapping(data: dict, where: str) -> dict:
    """Validated keyword arguments for RunConfig from a mapping (YAML file, JSON body)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys to values")
    out = {}
    for key, value in data.items():
        k = str(key).replace("-", "_")
        if k not in FIELDS:
            near = difflib.get_close_matches(k, FIELDS, n=1)
            hint = f"; did you mean '{near[0]}'?" if near else f"; valid keys: {', '.join(FIELDS)}"
            raise ConfigError(f"{where}: unknown key '{key}'{hint}")
        out[k] = _coerce(k, value, where)
    return out


def load_yaml(path: str | Path) -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
    return from_mapping(data, str(path))


def build_config(config_file: str | None = None, **flags) -> RunConfig:
    """YAML values, then flags that were given (None means 'not given'), then validation."""
    values = load_yaml(config_file) if config_file else {}
    values.update({k: v for k, v in flags.items() if v is not None})
    return RunConfig(**values).validate(config_file or "options")


def write_yaml(cfg: RunConfig, path: Path) -> None:
    import yaml

    from ollama_ft.rundir import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True))
