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
from ollama_ft.quants import DEFAULT_QUANT, parse_quants, quants_help

SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts",
              "polynomial", "inverse_sqrt")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
DEVICES = ("auto", "cpu", "cuda", "mps")
REPORT_TARGETS = ("none", "tensorboard", "mlflow", "wandb")


def report_targets(value: str | None) -> list[str]:
    """"tensorboard,mlflow" -> ["tensorboard", "mlflow"]; "" or None -> ["none"]."""
    out = [v.strip().lower() for v in (value or "none").split(",") if v.strip()]
    return out or ["none"]


def _f(default, help: str = "", choices: tuple[str, ...] | None = None, path: str | None = None):
    """A RunConfig field with what the CLI makes its flag from: help, choices, and for paths
    whether they name a "file" or a "dir"."""
    return field(default=default, metadata={"help": help, "choices": choices, "path": path})


@dataclass
class RunConfig:
    name: str | None = _f(None, "Run and model name (runs/NAME).")
    base: str | None = _f(None, "Local checkpoint folder, Hugging Face repo id, alias, or "
                          "ollama:NAME[:TAG] (a model of your Ollama; see `ollama-ft models`).")
    data: str | None = _f(None, "Training data: JSONL, JSON, CSV or Parquet.", path="file")
    output_dir: str | None = _f(None, "Run directory (default runs/NAME).", path="dir")
    # data
    format: str | None = _f(None, "Data format: messages, sharegpt, alpaca, prompt-response, "
                            "input-output (default: detected).")
    chat_format: str | None = _f(None, "Force a chat format (deepseek-r1, deepseek-r1-0528, "
                                 "deepseek-llm, deepseek-coder).")
    eval_split: float = _f(0.0, "Fraction of the data held out for eval.")
    eval_data: str | None = _f(None, "Held-out examples for eval (the training data's format).",
                               path="file")
    max_len: int = _f(2048, "Longest example in tokens.")
    packing: bool = _f(True, "Pack several examples per row of max-len tokens (examples never "
                       "attend to each other).")
    # optimisation
    epochs: float = _f(3.0, "Passes over the training data.")
    max_steps: int = _f(-1, "Stop after this many optimizer steps (-1: run the epochs).")
    lr: float = _f(2e-4, "Learning rate.")
    batch_size: int = _f(4, "Rows per step on each device.")
    grad_accum: int = _f(1, "Steps whose gradients are summed before the optimizer steps.")
    warmup: float = _f(0.03, "Warmup: a ratio < 1 or a number of steps.")
    scheduler: str = _f("cosine", "Learning-rate schedule.", choices=SCHEDULERS)
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm.")
    seed: int = _f(42, "Seed of the LoRA initialisation, shuffling and the eval split.")
    # the memory of one layer's activations; costs ~20%
    gradient_checkpointing: bool = _f(True, "Recompute activations in the backward pass (less "
                                      "memory, ~20% slower).")
    precision: str = _f("auto", "auto: bf16 on a GPU, and on a CPU with AVX512-BF16/AMX, else "
                        "fp32; fp16 on a GPU only.", choices=PRECISIONS)
    device: str = _f("auto", "Where to train.", choices=DEVICES)
    # LoRA
    lora_r: int = _f(16, "LoRA rank.")
    lora_alpha: int = _f(32, "LoRA alpha (the update is scaled by alpha / r).")
    lora_dropout: float = _f(0.05, "Dropout on the LoRA inputs.")
    lora_targets: list[str] | None = _f(None, "Comma-separated modules (default: every linear "
                                        "layer of the decoder).")
    dora: bool = _f(False, "DoRA: weight-decomposed LoRA.")
    rslora: bool = _f(False, "rsLoRA: scale by alpha / sqrt(r).")
    load_in_4bit: bool = _f(False, "QLoRA: the base's linear weights in 4-bit NF4 "
                            "(bitsandbytes >= 0.50; CPU or CUDA).")
    # bookkeeping
    logging_steps: int = _f(5, "Log the loss every N steps.")
    save_steps: int = _f(100, "Checkpoint every N steps.")
    save_total_limit: int = _f(3, "Checkpoints kept.")
    eval_steps: int | None = _f(None, "Evaluate every N steps (default: at each checkpoint).")
    early_stopping_patience: int | None = _f(3, "Stop after N evaluations without improvement.")
    report_to: str = _f("tensorboard", "Where training metrics also go: tensorboard "
                        "(RUN/tensorboard), mlflow, wandb (comma-separated; pip install mlflow "
                        "or wandb), or none.")
    resume: bool = _f(False, "Continue from the newest checkpoint.")
    # later stages
    quant: str = _f(DEFAULT_QUANT, quants_help())
    merged: bool = _f(False, "With an ollama:NAME base: register the base with the LoRA merged "
                      "in instead of FROM base + ADAPTER (automatic on daemons that refuse "
                      "adapters).")
    export: bool = _f(True, "Export GGUF files after training (--no-export: stop after "
                      "training).")
    register: bool = _f(True, "Register the model with Ollama after export.")
    # trust
    allow_pickle: bool = _f(False, "Accept .bin (pickle) weights.")
    trust_remote_code: bool = _f(False, "Run the checkpoint's own modelling code.")
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
