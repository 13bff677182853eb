"""Trainer callbacks: progress bar with loss, tokens/s, ETA, memory and the last checkpoint;
metrics.jsonl; TensorBoard / MLflow / W&B (--report-to); Ctrl-C."""

from __future__ import annotations

import resource
import signal
import sys
import time
from pathlib import Path

from transformers import TrainerCallback

from ollama_ft.train.metrics import append_metrics, plot_loss


def memory_mb(peak: bool = False) -> dict:
    """Memory now (rss_mb, gpu_mb), or the peak so far (peak_rss_mb, peak_gpu_mb): the
    process's RSS, and the GPU memory torch holds where there is a GPU."""
    if peak:
        out = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    else:
        import psutil

        out = {"rss_mb": round(psutil.Process().memory_info().rss / 2**20, 1)}
    try:
        import torch

        if torch.cuda.is_available():
            used = torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()
            out["peak_gpu_mb" if peak else "gpu_mb"] = round(used / 2**20, 1)
    except Exception:  # pragma: no cover - memory figures are best effort
        pass
    return out


def peak_memory_mb() -> dict:
    return memory_mb(peak=True)


REPORT_PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


def check_report_to(report_to: str) -> list[str]:
    """The --report-to targets, each one's package importable (else a clear error now)."""
    import importlib.util

    from ollama_ft.config import report_targets
    from ollama_ft.errors import ConfigError

    targets = [t for t in report_targets(report_to) if t != "none"]
    for t in targets:
        if importlib.util.find_spec(REPORT_PACKAGES[t]) is None:
            raise ConfigError(f"--report-to {t}: the {REPORT_PACKAGES[t]} package is not "
                              f"installed; pip install 'ollama-ft[{t}]' (or {REPORT_PACKAGES[t]}), "
                              "or use --report-to tensorboard|none")
    return targets


def report_callbacks(report_to: str, log_dir: Path) -> tuple[list[str], list]:
    """(report_to for TrainingArguments, callbacks to add): TensorBoard goes through
    transformers' own TensorBoardCallback, writing to RUN/tensorboard; mlflow and wandb
    through transformers' integrations as configured by their own environment variables."""
    targets = check_report_to(report_to)
    callbacks = []
    if "tensorboard" in targets:
        from transformers.integrations import TensorBoardCallback

        tb = TensorBoardCallback()
        tb.logging_dir = str(log_dir)
        callbacks.append(tb)
    return [t for t in targets if t != "tensorboard"] or ["none"], callbacks



class MetricsCallback(TrainerCallback):
    """One metrics.jsonl line per log; tokens/s from the Trainer's non-padding token count."""

    def __init__(self, metrics_path: Path, plot_path: Path, title: str, on_metrics=None):
        self.metrics_path, self.plot_path, self.title = metrics_path, plot_path, title
        self.on_metrics = on_metrics
        self.t0 = self.last_t = None
        self.last_tokens = 0
        self.last_row: dict = {}
        self.checkpoint: dict | None = None  # the last one saved: step, time

    def on_save(self, args, state, control, **kw):
        self.checkpoint = {"step": state.global_step, "time": round(time.time(), 3)}

    def on_train_begin(self, args, state, control, **kw):
        self.t0 = self.last_t = time.perf_counter()
        self.last_tokens = state.num_input_tokens_seen

    def on_log(self, args, state, control, logs=None, **kw):
        if not state.is_world_process_zero or not logs:
            return
        now = time.perf_counter()
        tokens = state.num_input_tokens_seen
        dt = max(now - self.last_t, 1e-9)
        row = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
        for key in ("loss", "eval_loss", "learning_rate", "grad_norm"):
            if key in logs:
                row["lr" if key == "learning_rate" else key] = logs[key]
        if "loss" in logs:
            row["tokens_per_s"] = round((tokens - self.last_tokens) / dt, 1)
            self.last_t, self.last_tokens = now, tokens
        row["tokens_seen"] = tokens
        row["elapsed_s"] = round(now - self.t0, 2)
        row.update(memory_mb())
        row.update(peak_memory_mb())
        if self.checkpoint:
            row["checkpoint"] = self.checkpoint
        if not any(k in row for k in ("loss", "eval_loss")):
            return  # the end-of-training summary log: report.json has it
        for k in ("tokens_per_s", "rss_mb", "gpu_mb"):  # the callbacks after us (TensorBoard) see them
            if k in row:
                logs[k] = row[k]
        append_metrics(self.metrics_path, row)
        self.last_row = {**self.last_row, **row}
        if "eval_loss" in row:
            plot_loss(self.metrics_path, self.plot_path, self.title)
        if self.on_metrics:
            self.on_metrics(row)


class ProgressCallback(TrainerCallback):
    """A tqdm bar over optimizer steps showing loss, tokens/s and ETA (rank 0 only)."""

    def __init__(self, metrics: MetricsCallback):
        self.metrics = metrics
        self.bar = None

    def on_train_begin(self, args, state, control, **kw):
        if state.is_world_process_zero:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, initial=state.global_step, unit="step",
                            desc="training", dynamic_ncols=True, file=sys.stderr)

    def on_step_end(self, args, state, control, **kw):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kw):
        if self.bar is None:
            return
        row = self.metrics.last_row
        post = {}
        if "loss" in row:
            post["loss"] = f"{row['loss']:.4f}"
        if "eval_loss" in row:
            post["eval"] = f"{row['eval_loss']:.4f}"
        if "tokens_per_s" in row:
            post["tok/s"] = f"{row['tokens_per_s']:.0f}"
        if "rss_mb" in row:
            post["mem"] = f"{row['rss_mb'] / 1024:.1f}G" + (
                f"/gpu {row['gpu_mb'] / 1024:.1f}G" if "gpu_mb" in row else "")
        if self.metrics.checkpoint:
            post["ckpt"] = self.metrics.checkpoint["step"]
        self.bar.set_postfix(post, refresh=True)

    def on_train_end(self, args, state, control, **kw):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class InterruptCallback(TrainerCallback):
    """Ctrl-C (SIGINT) or SIGTERM: finish the step, save a checkpoint, stop cleanly."""

    def __init__(self):
        self.interrupted = False
        self._old = {}

    def _handle(self, signum, frame):
        if self.interrupted:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.interrupted = True
        print("\ninterrupted: saving a checkpoint after this step (Ctrl-C again to abort)",
              file=sys.stderr)

    def on_train_begin(self, args, state, control, **kw):
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)

    def on_step_end(self, args, state, control, **kw):
        if self.interrupted:
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kw):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}
