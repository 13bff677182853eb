"""A training job's worker process: `python -m ollama_ft.serve.jobworker JOB_DIR`.

Runs the pipeline (train, export, Modelfile, register) for JOB_DIR/job.json, appending
progress to JOB_DIR/events.ndjson and the outcome to JOB_DIR/result.json.

The bridge hands the worker a token on its stdin (never in its environment); it is sent
only to the bridge that started the worker (OLLAMA_FT_BRIDGE_URL). A full disk is a clear
error and leaves the job resumable; an unexpected failure is an error id for the client,
the traceback stays in JOB_DIR/worker.log.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from transformers import TrainerCallback


class ProgressEvents(TrainerCallback):
    def __init__(self, emit, run_dir: Path | None = None):
        self.emit = emit
        self.run_dir = run_dir
        self.t0 = None
        self.checkpoint = None

    def on_save(self, args, state, control, **kw):
        if state.is_world_process_zero:
            self.checkpoint = {"step": state.global_step, "time": round(time.time(), 3)}
            self.emit({"type": "checkpoint", **self.checkpoint})

    def on_train_begin(self, args, state, control, **kw):
        self.t0 = time.perf_counter()
        self.start_step = state.global_step
        if state.is_world_process_zero and self.run_dir is not None:
            from ollama_ft.run import Run

            data = Run(self.run_dir).data_report  # the check, done by now
            if data:
                self.emit({"type": "data", "report": data.get("train"),
                           "train_examples": data.get("train_examples"),
                           "eval_examples": data.get("eval_examples")})
        self.emit({"type": "stage", "stage": "train", "max_steps": state.max_steps})

    def on_log(self, args, state, control, logs=None, **kw):
        if not state.is_world_process_zero or not logs:
            return
        if not any(k in logs for k in ("loss", "eval_loss")):
            return  # the end-of-training summary: the job's result says it
        elapsed = time.perf_counter() - self.t0
        done = max(state.global_step - self.start_step, 1)
        eta = elapsed / done * (state.max_steps - state.global_step)
        ev = {"type": "progress", "step": state.global_step, "max_steps": state.max_steps,
              "epoch": round(state.epoch or 0, 3), "eta_s": round(eta, 1)}
        for k in ("loss", "eval_loss", "learning_rate"):
            if k in logs:
                ev[k] = logs[k]
        if elapsed > 0:
            ev["tokens_per_s"] = round((state.num_input_tokens_seen or 0) / elapsed, 1)
        from ollama_ft.train.callbacks import memory_mb

        ev.update(memory_mb())
        if self.checkpoint:
            ev["checkpoint"] = self.checkpoint
        self.emit(ev)


def read_token() -> str:
    """The bridge's token for this worker: one line on stdin (nothing when run by hand)."""
    try:
        if sys.stdin is None or sys.stdin.isatty():
            return ""
        return sys.stdin.readline().strip()
    except (OSError, ValueError):
        return ""


def set_aside_partial_checkpoints(run_dir: Path, log=print) -> list[str]:
    """A checkpoint a kill cut short has no trainer_state.json (the Trainer writes it last);
    resuming from it would fail, so it is renamed out of the trainer's sight."""
    moved = []
    ck = Path(run_dir) / "checkpoints"
    if not ck.is_dir():
        return moved
    for d in sorted(ck.glob("checkpoint-*")):
        if d.is_dir() and not (d / "trainer_state.json").is_file():
            target = ck / f".partial-{d.name}-{int(time.time())}"
            d.rename(target)
            moved.append(d.name)
            log(f"set aside {d.name}: it was cut short (no trainer_state.json)")
    return moved


def main(job_dir: str) -> int:
    from ollama_ft.config import RunConfig
    from ollama_ft.errors import OllamaFtError
    from ollama_ft.ollama.client import use_bridge_token
    from ollama_ft.pipeline import run_pipeline
    from ollama_ft.rundir import write_json
    from ollama_ft.serve.incidents import describe, disk_full

    token = read_token()
    if token and os.environ.get("OLLAMA_FT_BRIDGE_URL"):
        use_bridge_token(os.environ["OLLAMA_FT_BRIDGE_URL"], token)
    d = Path(job_dir)
    job = json.loads((d / "job.json").read_text())
    events = d / "events.ndjson"
    stage = {"now": "train"}

    def emit(ev):
        with open(events, "a", encoding="utf-8") as f:
            f.write(json.dumps({"time": time.time(), **ev}) + "\n")

    def log(msg=""):
        print(msg, flush=True)
        if msg.strip():
            emit({"type": "log", "message": str(msg)})

    def on_stage(name):
        stage["now"] = name
        emit({"type": "stage", "stage": name})

    cfg = RunConfig(**job["config"])
    artifacts: dict = {}
    try:
        if cfg.resume:
            set_aside_partial_checkpoints(cfg.run_dir, log)
        result = run_pipeline(cfg, log=log, callbacks=[ProgressEvents(emit, cfg.run_dir)],
                              on_stage=on_stage, host=os.environ.get("OLLAMA_FT_REGISTER_HOST"),
                              artifacts=artifacts)
        if result.interrupted:
            write_json(d / "result.json", {"ok": False, "error": "stopped", "artifacts": artifacts})
            return 1
        if artifacts.get("eval"):
            emit({"type": "eval", "eval": {k: artifacts["eval"][k] for k in ("base", "fine_tuned")}})
        write_json(d / "result.json", {"ok": True, "artifacts": artifacts})
        return 0
    except OllamaFtError as e:
        full = _disk_full_cause(e)
        message = str(e) if full is None else _full_message(stage["now"], full)
        _result(d, message, artifacts)
        return 2
    except Exception as e:
        import secrets
        import traceback

        if disk_full(e):
            traceback.print_exc()
            _result(d, _full_message(stage["now"], e), artifacts)
            return 2
        # a bug: the client gets what and an id, the traceback stays in worker.log
        eid = secrets.token_hex(4)
        print(f"error id {eid}:", flush=True)
        traceback.print_exc()
        _result(d, f"the job failed at its {stage['now']} stage: {describe(e)}; error id {eid} "
                   "(the job's worker.log on the bridge has the details)", artifacts)
        return 1


def _disk_full_cause(e: BaseException):
    """The OSError that says the disk is full, if one is behind `e`."""
    from ollama_ft.serve.incidents import disk_full

    seen = 0
    while e is not None and seen < 10:
        if disk_full(e):
            return e
        e = e.__cause__ or e.__context__
        seen += 1
    return None


def _full_message(stage: str, e: OSError) -> str:
    import errno

    what = ("a file grew past the size limit set for the bridge (RLIMIT_FSIZE)"
            if e.errno == errno.EFBIG else "no space is left on the disk"
            if e.errno in (errno.ENOSPC, errno.EDQUOT)
            else "a write was cut short (no space left, or a file size limit)")
    return (f"the disk is full: {what} during the {stage} stage. Files finished before it are "
            "kept whole; free space on the bridge's disk, then resume the job")


def _result(d: Path, error: str, artifacts: dict) -> None:
    from ollama_ft.rundir import write_json

    try:
        write_json(d / "result.json", {"ok": False, "error": error, "artifacts": artifacts})
    except OSError:  # the disk is that full: the bridge says the worker stopped without one
        print(f"could not write result.json: {error}", flush=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
