"""The train stage: resolve the base, check the data, train a LoRA adapter, save it.

`train_stage(cfg)` is what `ollama-ft train` and the bridge's jobs call. It writes, in the
run directory: run.yaml, data-report.json, checkpoints/, metrics.jsonl, loss.png,
adapter/ and the `train` section of report.json.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ollama_ft.config import RunConfig, write_yaml
from ollama_ft.data.tokenize import IGNORE
from ollama_ft.errors import ConfigError, TrainingError
from ollama_ft.run import Run
from ollama_ft.rundir import RUN_FILES, write_json


@dataclass
class TrainResult:
    run_dir: Path
    adapter_dir: Path | None
    steps: int
    train_loss: float | None
    eval_loss: float | None
    interrupted: bool
    runtime_s: float


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def pick_device_and_precision(cfg: RunConfig) -> tuple[str, str]:
    import torch

    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda was asked for but torch sees no CUDA GPU "
                          f"(torch {torch.__version__}); install a CUDA build of torch or use cpu")
    from ollama_ft.train.precision import cpu_has_bf16

    precision = cfg.precision
    if precision == "auto":
        if device == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:  # the frozen base in bf16 where the CPU computes it natively (train/precision.py)
            precision = "bf16" if cpu_has_bf16() else "fp32"
    if precision == "fp16" and device == "cpu":
        raise ConfigError("precision: fp16 needs a GPU; use bf16 (on a CPU with AVX512-BF16 or "
                          "AMX) or fp32 on the CPU")
    if precision == "bf16" and device == "cpu" and not cpu_has_bf16():
        raise ConfigError("precision: bf16 on this CPU would be emulated (no avx512_bf16 / "
                          "amx_bf16 in /proc/cpuinfo) and slower than fp32; use fp32 or auto")
    return device, precision


class Collator:
    """Pad a batch to its longest example; labels padded with IGNORE."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch):
        import torch

        n = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), n), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), n), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for i, b in enumerate(batch):
            k = len(b["input_ids"])
            ids[i, :k] = torch.as_tensor(b["input_ids"])
            labels[i, :k] = torch.as_tensor(b["labels"])
            mask[i, :k] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def load_tokenizer(base, cfg: RunConfig):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base.path, trust_remote_code=cfg.trust_remote_code)


def prepare_data(cfg: RunConfig, base, tokenizer, log=print):
    """Check every file before anything trains; returns (train, eval, report, full report):
    train and eval are views of the token store (data/store.py), not lists of tokens."""
    from ollama_ft.data.check import check_data

    _, encoded, report = check_data(cfg.data, tokenizer, base.chat_format, cfg.max_len,
                                    cfg.format, log=log)
    eval_enc, eval_report = encoded.select([]), None
    if cfg.eval_data:
        _, eval_enc, eval_report = check_data(cfg.eval_data, tokenizer, base.chat_format,
                                              cfg.max_len, cfg.format, log=log)
    elif cfg.eval_split:
        import numpy as np

        from ollama_ft.data.split import eval_indices

        eval_idx = eval_indices(len(encoded), cfg.eval_split, cfg.seed)
        if len(eval_idx) >= len(encoded):
            raise ConfigError(f"eval_split {cfg.eval_split} leaves no training examples "
                              f"({len(encoded)} in all)")
        held = np.zeros(len(encoded), dtype=bool)
        held[np.fromiter(eval_idx, dtype=np.int64, count=len(eval_idx))] = True
        eval_enc = encoded.select(np.flatnonzero(held))  # in data order, as before
        encoded = encoded.select(np.flatnonzero(~held))
    full = {"train": report.to_json(), "train_examples": len(encoded),
            "eval_examples": len(eval_enc)}
    if eval_report:
        full["eval"] = eval_report.to_json()
    return encoded, eval_enc, report, full


def load_model(base, cfg: RunConfig, device: str, precision: str):
    import torch
    from transformers import AutoModelForCausalLM

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    kwargs = {"dtype": dtype, "trust_remote_code": cfg.trust_remote_code}
    if cfg.load_in_4bit:  # QLoRA, on the GPU or the CPU (train/qlora.py)
        from ollama_ft.train.qlora import check_4bit, quantization_config

        check_4bit(device)
        kwargs["quantization_config"] = quantization_config(device, precision)
        rank = int(os.environ.get("LOCAL_RANK", "0"))  # a DDP rank loads onto its own GPU
        kwargs["device_map"] = {"": "cpu" if device == "cpu" else rank}
    try:
        model = AutoModelForCausalLM.from_pretrained(base.path, **kwargs)
    except (OSError, ValueError) as e:
        raise TrainingError(f"{base.path}: the checkpoint could not be loaded: {e}") from None
    if cfg.load_in_4bit:
        from ollama_ft.train.qlora import prepare

        model = prepare(model, cfg.gradient_checkpointing)
    return model


def _checkpoints_dir(cfg) -> Path:
    return cfg.run_dir / RUN_FILES["checkpoints"]


def _resume_checkpoint(cfg) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    ckdir = _checkpoints_dir(cfg)
    last = get_last_checkpoint(str(ckdir)) if ckdir.is_dir() else None
    if cfg.resume:
        if last is None:
            raise TrainingError(f"--resume: no checkpoint in {ckdir}; run without --resume to "
                                "start this run")
        return last
    if last is not None:
        raise TrainingError(f"{cfg.run_dir} already holds checkpoints of an earlier run; pass "
                            "--resume to continue it, or pick another --name / --output-dir")
    return None


def train_stage(cfg: RunConfig, base=None, callbacks=(), log=print,
                host: str | None = None) -> TrainResult:
    """Train the LoRA adapter of `cfg` into cfg.run_dir. Returns a TrainResult. `host`: the
    Ollama daemon of an `ollama:NAME` base (default OLLAMA_HOST)."""
    from ollama_ft.hub import resolve_base

    t_start = time.perf_counter()
    run_dir = cfg.run_dir
    main = is_main_process()
    device, precision = _preflight(cfg)
    resume_from = _resume_checkpoint(cfg)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_yaml(cfg, run_dir / RUN_FILES["config"])

    base = base or resolve_base(cfg.base, allow_pickle=cfg.allow_pickle,
                                trust_remote_code=cfg.trust_remote_code,
                                chat_format=cfg.chat_format, host=host, log=log)
    log(f"base: {base.describe()}")
    tokenizer = load_tokenizer(base, cfg)
    if base.ollama is None:  # an Ollama base's TEMPLATE is the reference itself
        from ollama_ft.data.tokenize import verify_chat_format

        verify_chat_format(tokenizer, base.chat_format, str(base.repo_id or base.path))
    train_enc, eval_enc, report, full_report = prepare_data(cfg, base, tokenizer, log)
    if main:
        write_json(run_dir / RUN_FILES["data_report"], full_report)
    for line in report.summary_lines():
        log("  " + line)

    log(f"device: {device}, precision: {precision}")
    model, trainable = _peft_model(base, cfg, device, precision, log)
    trainer, interrupt, metrics_cb = _make_trainer(cfg, model, tokenizer, train_enc, eval_enc,
                                                   device, precision, callbacks)
    from ollama_ft.train.callbacks import check_report_to

    if "tensorboard" in check_report_to(cfg.report_to):
        log(f"watch it live: tensorboard --logdir {run_dir / 'tensorboard'}")
    out = _fit(trainer, cfg, resume_from)
    state = trainer.state
    eval_losses = [h["eval_loss"] for h in state.log_history if "eval_loss" in h]
    adapter_dir = None
    if not interrupt.interrupted:
        from ollama_ft.train.distributed import adapter_state_dict

        weights = adapter_state_dict(trainer.model, trainer.accelerator)  # all ranks: gathers shards
        if main:
            adapter_dir = _save_adapter(trainer.model, run_dir, weights)
    result = TrainResult(run_dir, adapter_dir, state.global_step,
                         out.metrics.get("train_loss") if out else None,
                         eval_losses[-1] if eval_losses else None, interrupt.interrupted,
                         round(time.perf_counter() - t_start, 2))
    if main:
        from ollama_ft.train.metrics import plot_loss

        plot_loss(run_dir / RUN_FILES["metrics"], run_dir / RUN_FILES["loss_plot"], cfg.name)
        Run(run_dir).record("train", _train_section(
            cfg, base, device, precision, state, out, result, metrics_cb.last_row, report,
            trainable))
    return result


def _preflight(cfg: RunConfig) -> tuple[str, str]:
    """The device and precision, after the checks that must fail before anything loads."""
    from ollama_ft.train.callbacks import check_report_to
    from ollama_ft.train.distributed import check_sharding

    device, precision = pick_device_and_precision(cfg)
    check_sharding(device)  # FSDP / ZeRO-3 asked of a CPU run: refused before anything loads
    check_report_to(cfg.report_to)  # a missing mlflow/wandb: said now, not after loading
    if cfg.load_in_4bit:  # and a missing bitsandbytes
        from ollama_ft.train.qlora import check_4bit

        check_4bit(device)
    return device, precision


def _peft_model(base, cfg: RunConfig, device: str, precision: str, log):
    """The base with its LoRA layers, ready to train; and the number of trainable parameters."""
    from peft import get_peft_model
    from transformers import set_seed

    from ollama_ft.train.lora import exact_targets, lora_config

    model = load_model(base, cfg, device, precision)
    set_seed(cfg.seed)  # LoRA's A matrices are drawn here: same seed, same adapter init
    with exact_targets(base.architecture):
        model = get_peft_model(model, lora_config(cfg, base.architecture))
    if precision != "fp32":  # a bf16/fp16 base: LoRA weights, gradients, Adam state in fp32
        from ollama_ft.train.precision import keep_trainable_fp32

        keep_trainable_fp32(model)
    if device == "cpu":  # GPUs have their own fused dropout and caching allocator
        from ollama_ft.train.allocator import limit_heap_caching
        from ollama_ft.train.dropout import use_fast_lora_dropout

        use_fast_lora_dropout(model)
        limit_heap_caching()
    trainable, total = model.get_nb_trainable_parameters()
    log(f"LoRA r={cfg.lora_r} alpha={cfg.lora_alpha} on "
        f"{', '.join(model.peft_config['default'].target_modules)}: "
        f"{trainable:,} trainable of {total:,} parameters")
    return model, trainable


def _fit(trainer, cfg: RunConfig, resume_from):
    try:
        return trainer.train(resume_from_checkpoint=resume_from)
    except RuntimeError as e:
        if "out of memory" in str(e).lower():
            raise TrainingError("out of memory: lower --batch-size or --max-len, raise "
                                "--grad-accum, or keep --gradient-checkpointing on"
                                " / --load-in-4bit; checkpoints so far are kept in "
                                f"{_checkpoints_dir(cfg)}") from None
        raise


def _train_section(cfg, base, device, precision, state, out, result, last: dict, report,
                   trainable: int) -> dict:
    """report.json's train section."""
    return {
        "base": base.spec, "base_path": str(base.path), "repo_id": base.repo_id,
        "architecture": base.architecture, "chat_format": base.chat_format.name,
        "device": device, "precision": precision, "load_in_4bit": cfg.load_in_4bit,
        "steps": state.global_step,
        "max_steps": state.max_steps, "epochs": round(state.epoch or 0, 3),
        "final_loss": last.get("loss"), "eval_loss": result.eval_loss,
        "train_loss_mean": result.train_loss, "tokens_seen": state.num_input_tokens_seen,
        "tokens_per_s": round(state.num_input_tokens_seen / max(out.metrics.get(
            "train_runtime", 1e-9), 1e-9), 1) if out else None,
        "runtime_s": result.runtime_s, **_peak(), "interrupted": result.interrupted,
        "adapter": str(result.adapter_dir) if result.adapter_dir else None,
        "system_prompt": report.system_prompt,
        "trainable_parameters": trainable, **_ollama_base_entry(base)}


def _ollama_base_entry(base) -> dict:
    from ollama_ft.ollama_base.resolve import report_entry
    from ollama_ft.run import OLLAMA_BASE_KEY

    entry = report_entry(base)
    return {OLLAMA_BASE_KEY: entry} if entry else {}


def _peak():
    from ollama_ft.train.callbacks import peak_memory_mb

    return peak_memory_mb()


def _make_trainer(cfg, model, tokenizer, train_enc, eval_enc, device, precision, callbacks):
    from transformers import EarlyStoppingCallback, TrainingArguments

    from ollama_ft.train.callbacks import (
        InterruptCallback,
        MetricsCallback,
        ProgressCallback,
        report_callbacks,
    )
    from ollama_ft.train.dataset import PackedDataset, TokenDataset
    from ollama_ft.train.packing import PackedCollator

    report_to, report_cbs = report_callbacks(cfg.report_to, cfg.run_dir / "tensorboard")
    has_eval = bool(eval_enc)
    eval_steps = cfg.eval_steps or cfg.save_steps
    args = TrainingArguments(
        output_dir=str(_checkpoints_dir(cfg)),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.lr,
        lr_scheduler_type=cfg.scheduler,
        warmup_steps=cfg.warmup if cfg.warmup < 1 else int(cfg.warmup),
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=eval_steps if has_eval else None,
        load_best_model_at_end=has_eval and cfg.early_stopping_patience is not None,
        metric_for_best_model="eval_loss" if has_eval else None,
        greater_is_better=False if has_eval else None,
        seed=cfg.seed,
        data_seed=cfg.seed,
        # autocast (GPU and CPU): bf16 compute; the LoRA weights stay fp32 (their master copy)
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=device == "cpu",
        gradient_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        include_num_input_tokens_seen="no" if cfg.packing else "non_padding",
        report_to=report_to,
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_pin_memory=device == "cuda",
        ddp_find_unused_parameters=False,
        ddp_backend="gloo" if device == "cpu" and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
    )
    metrics_cb = MetricsCallback(cfg.run_dir / RUN_FILES["metrics"],
                                 cfg.run_dir / RUN_FILES["loss_plot"], cfg.name or "")
    interrupt = InterruptCallback()
    cbs = [metrics_cb, ProgressCallback(metrics_cb), interrupt, *report_cbs, *callbacks]
    if has_eval and cfg.early_stopping_patience is not None:
        cbs.append(EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if cfg.packing:  # rows of examples, read from the token store batch by batch
        rows, eval_rows = PackedDataset(train_enc, cfg.max_len), PackedDataset(eval_enc, cfg.max_len)
    else:
        rows, eval_rows = TokenDataset(train_enc), TokenDataset(eval_enc)
    from ollama_ft.train.lora_trainer import LoRATrainer

    trainer = LoRATrainer(
        model=model, args=args, data_collator=PackedCollator(pad_id) if cfg.packing else Collator(pad_id),
        train_dataset=rows, eval_dataset=eval_rows if len(eval_rows) else None, callbacks=cbs)
    # the default console printer duplicates our bar
    from transformers.trainer_callback import PrinterCallback
    from transformers.trainer_callback import ProgressCallback as HFProgress

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(HFProgress)
    return trainer, interrupt, metrics_cb


def _save_adapter(model, run_dir: Path, state_dict: dict | None = None) -> Path:
    """Save the PEFT adapter under a temporary name, then swap it into place. `state_dict`:
    the adapter's weights gathered whole when the model is sharded (adapter_state_dict)."""
    final = run_dir / RUN_FILES["adapter"]
    tmp = run_dir / f".{RUN_FILES['adapter']}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    model = getattr(model, "module", model)  # FSDP1 wraps; FSDP2 and ZeRO-3 do not
    if state_dict is None:
        model.save_pretrained(tmp, safe_serialization=True)
    else:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final
