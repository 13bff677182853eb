"""`train` end to end: the train stage, then export, Modelfile and registration.

Each stage also runs alone (`ollama-ft export RUN`, `modelfile RUN`, `register RUN`) over
the same run directory; these functions are what the CLI and the bridge's jobs call.
"""

from __future__ import annotations

from pathlib import Path

from ollama_ft.config import RunConfig
from ollama_ft.errors import OllamaFtError
from ollama_ft.rundir import RUN_FILES, read_json, update_report


def run_pipeline(cfg: RunConfig, log=print, callbacks=(), on_stage=None, host: str | None = None,
                 artifacts: dict | None = None):
    """Train, then (as cfg says) export, write the Modelfile and register. `artifacts`, when
    given, is filled in as each stage finishes, so a failure still leaves what was made."""
    from ollama_ft.train.trainer import train_stage

    artifacts = {} if artifacts is None else artifacts
    artifacts["run_dir"] = str(cfg.run_dir)
    result = train_stage(cfg, callbacks=callbacks, log=log, host=host)
    if result.interrupted:
        log(f"stopped at step {result.steps}; a checkpoint is in {cfg.run_dir / 'checkpoints'}. "
            f"Continue with: ollama-ft train --config {cfg.run_dir / 'run.yaml'} --resume")
        return result
    artifacts.update(adapter=str(result.adapter_dir), loss_plot=str(cfg.run_dir / "loss.png"))
    log(f"adapter: {result.adapter_dir}")
    log(f"loss curve: {cfg.run_dir / 'loss.png'}  metrics: {cfg.run_dir / 'metrics.jsonl'}")
    if not cfg.export:
        return result
    from ollama_ft.export import export_stage

    if on_stage:
        on_stage("export")
    exported = export_stage(cfg.run_dir, quants=cfg.quant, log=log)
    artifacts["gguf"] = {q: str(p) for q, p in exported.files.items()}
    if cfg.register:  # registering writes the Modelfile it sends
        if on_stage:
            on_stage("register")
        reg = register_stage(cfg.run_dir, cfg.name, host=host, log=log)
        artifacts.update(modelfile=str(reg.modelfile), model=reg.name)
    else:
        _, path = modelfile_stage(cfg.run_dir, log=log)
        artifacts["modelfile"] = str(path)
    if cfg.eval_split or cfg.eval_data:  # base vs fine-tune on the held-out examples
        from ollama_ft.evaluation import eval_stage

        if on_stage:
            on_stage("eval")
        artifacts["eval"] = eval_stage(cfg.run_dir, log=log)
        artifacts.update(eval_report=str(cfg.run_dir / "eval.md"),
                         eval_plot=str(cfg.run_dir / "eval.png"))
    return result


def modelfile_stage(run_dir, *, system: str | None = None, overrides=None, template_file=None,
                    quant=None, name: str | None = None, adapter: bool = False,
                    merged: bool | None = None, log=print):
    """Write RUN/Modelfile for the run (SYSTEM from training when every example shared one)."""
    from ollama_ft.ollama.templates import modelfile_for_run, write_modelfile

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise OllamaFtError(f"{run_dir}: no such run directory")
    train = (read_json(run_dir / RUN_FILES["report"], {}) or {}).get("train") or {}
    if system is None:
        system = train.get("system_prompt")
    if quant:
        from ollama_ft.export.quantize import parse_quants

        quant = parse_quants(quant)[0].name
    mf = modelfile_for_run(run_dir, system=system, overrides=overrides, template_file=template_file,
                           quant=quant, adapter=adapter, merged=merged)
    name = name or _run_name(run_dir)
    path = write_modelfile(run_dir, mf, header=f"ollama create {name} -f Modelfile")
    log(f"Modelfile: {path}")
    return mf, path


def register_stage(run_dir, name: str | None = None, *, host: str | None = None, log=print,
                   **modelfile_args):
    from ollama_ft.ollama.client import register
    from ollama_ft.ollama.names import parse_name

    from ollama_ft.ollama.client import AdapterRefused

    run_dir = Path(run_dir)
    name = parse_name(name or _run_name(run_dir)).short  # validated before anything is sent
    mf, _ = modelfile_stage(run_dir, name=name, log=log, **modelfile_args)
    try:
        result = register(run_dir, mf, name, host=host, log=log,
                          expected=_expected(run_dir, mf, modelfile_args.get("template_file")))
    except AdapterRefused as e:
        report = read_json(run_dir / RUN_FILES["report"], {}) or {}
        from ollama_ft.ollama_base.resolve import of_run

        if of_run(report) is None:
            raise
        # Ollama 0.34.1 and later create no adapter models: the base with the LoRA merged in
        log(f"the daemon refused the adapter form ({e.reason}); registering a merged model")
        from ollama_ft.ollama_base.export import export_ollama_run

        export_ollama_run(run_dir, report, merged=True, log=log)
        mf, _ = modelfile_stage(run_dir, name=name, log=log, **{**modelfile_args, "merged": True})
        result = register(run_dir, mf, name, host=host, log=log,
                          expected=_expected(run_dir, mf, modelfile_args.get("template_file")))
    update_report(run_dir, "register", {
        "name": result.name, "host": result.host, "ollama_version": result.version,
        "from": mf.from_, "adapter": mf.adapter,
        "uploaded": result.uploaded, "skipped": result.skipped, "seconds": result.seconds,
        "reply": result.reply[:200],
        "verification": result.verification.as_report() if result.verification else None})
    log(f"\n  ollama run {result.name}\n")
    return result


def _expected(run_dir: Path, mf, template_file):
    """What training renders, for register's check of what the daemon renders."""
    from ollama_ft.ollama.verify import Expected

    report = read_json(run_dir / RUN_FILES["report"], {}) or {}
    from ollama_ft.ollama_base.resolve import of_run

    ollama = of_run(report)
    if ollama is not None:  # trained on the daemon's own TEMPLATE
        base = (report.get("train") or {}).get("base_path")
        return Expected(ollama[1], Path(base) / "tokenizer.json" if base else None, mf.system)
    train, export = report.get("train") or {}, report.get("export") or {}
    fmt = None if template_file else (train.get("chat_format") or export.get("chat_format"))
    base = export.get("base_path") or train.get("base_path")
    return Expected(fmt, Path(base) / "tokenizer.json" if base else None, mf.system)


def _run_name(run_dir: Path) -> str:
    import yaml

    cfg_path = run_dir / RUN_FILES["config"]
    if cfg_path.is_file():
        name = (yaml.safe_load(cfg_path.read_text(encoding="utf-8")) or {}).get("name")
        if name:
            return name
    return run_dir.name
