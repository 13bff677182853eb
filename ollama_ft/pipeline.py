"""`train` end to end: the train stage, then the stages that follow it (export, register)."""

from __future__ import annotations

from ollama_ft.config import RunConfig


def run_pipeline(cfg: RunConfig, log=print, callbacks=()):
    from ollama_ft.train.trainer import train_stage

    result = train_stage(cfg, callbacks=callbacks, log=log)
    if result.interrupted:
        log(f"stopped at step {result.steps}; a checkpoint is in {cfg.run_dir / 'checkpoints'}. "
            f"Continue with: ollama-ft train --config {cfg.run_dir / 'run.yaml'} --resume")
        return result
    log(f"adapter: {result.adapter_dir}")
    log(f"loss curve: {cfg.run_dir / 'loss.png'}  metrics: {cfg.run_dir / 'metrics.jsonl'}")
    return result
