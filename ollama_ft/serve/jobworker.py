"""A training job's worker process: `python -m ollama_ft.serve.jobworker JOB_DIR`.

Runs the pipeline (train, export, Modelfile, register) for JOB_DIR/job.json, appending
progress to JOB_DIR/events.ndjson and the outcome to JOB_DIR/result.json.
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
            from ollama_ft.rundir import RUN_FILES, read_json

            data = read_json(self.run_dir / RUN_FILES["data_report"])  # the check, done by now
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


def main(job_dir: str) -> int:
    from ollama_ft.config import RunConfig
    from ollama_ft.errors import OllamaFtError
    from ollama_ft.pipeline import run_pipeline
    from ollama_ft.rundir import write_json

    d = Path(job_dir)
    job = json.loads((d / "job.json").read_text())
    events = d / "events.ndjson"

    def emit(ev):
        with open(events, "a", encoding="utf-8") as f:
            f.write(json.dumps({"time": time.time(), **ev}) + "\n")

    def log(msg=""):
        print(msg, flush=True)
        if msg.strip():
            emit({"type": "log", "message": str(msg)})

    cfg = RunConfig(**job["config"])
    artifacts: dict = {}
    try:
        result = run_pipeline(cfg, log=log, callbacks=[ProgressEvents(emit, cfg.run_dir)],
                              on_stage=lambda stage: emit({"type": "stage", "stage": stage}),
                              host=os.environ.get("OLLAMA_FT_REGISTER_HOST"), artifacts=artifacts)
        if result.interrupted:
            write_json(d / "result.json", {"ok": False, "error": "stopped", "artifacts": artifacts})
            return 1
        if artifacts.get("eval"):
            emit({"type": "eval", "eval": {k: artifacts["eval"][k] for k in ("base", "fine_tuned")}})
        write_json(d / "result.json", {"ok": True, "artifacts": artifacts})
        return 0
    except OllamaFtError as e:
        write_json(d / "result.json", {"ok": False, "error": str(e), "artifacts": artifacts})
        return 2
    except Exception as e:  # a bug: keep the message for the job, the traceback for the log
        import traceback

        traceback.print_exc()
        write_json(d / "result.json", {"ok": False, "error": f"{type(e).__name__}: {e}",
                                       "artifacts": artifacts})
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
