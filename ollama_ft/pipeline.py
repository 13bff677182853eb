"""`train` end to end: the train stage, then export, Modelfile and registration.

Each stage also runs alone (`ollama-ft export RUN`, `modelfile RUN`, `register RUN`) over
the same run directory; these functions are what the CLI and the bridge's jobs call.
"""

from __future__ import annotations

from pathlib import Path

from ollama_ft.config import RunConfig
from ollama_ft.run import Run


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
            f"Continue with: ollama-ft train --config {Run(cfg.run_dir).path('config')} --resume")
        return result
    artifacts.update(adapter=str(result.adapter_dir), loss_plot=str(cfg.run_dir / "loss.png"))
    log(f"adapter: {result.adapter_dir}")
    log(f"loss curve: {cfg.run_dir / 'loss.png'}  metrics: {cfg.run_dir / 'metrics.jsonl'}")
    if not cfg.export:
        return result
    run = Run.open(cfg.run_dir)  # one Run from here on: each fact read from disk once
    if on_stage:
        on_stage("export")
    exported = export_run(run, quants=cfg.quant, log=log)
    artifacts["gguf"] = {q: str(p) for q, p in exported.files.items()}
    if cfg.register:  # registering writes the Modelfile it sends
        if on_stage:
            on_stage("register")
        reg = register_stage(run, cfg.name, host=host, log=log)
        artifacts.update(modelfile=str(reg.modelfile), model=reg.name)
    else:
        _, path = modelfile_stage(run, log=log)
        artifacts["modelfile"] = str(path)
    if cfg.eval_split or cfg.eval_data:  # base vs fine-tune on the held-out examples
        from ollama_ft.evaluation import eval_stage

        if on_stage:
            on_stage("eval")
        artifacts["eval"] = eval_stage(run, log=log)
        artifacts.update(eval_report=str(cfg.run_dir / "eval.md"),
                         eval_plot=str(cfg.run_dir / "eval.png"))
    return result


def export_run(run, quants=None, adapter_only: bool = False, log=print, base=None,
               threads: int | None = None, merged: bool | None = None):
    """The export of a run: a run on an Ollama base writes adapter.gguf (and with `merged`, the
    base's GGUF with the LoRA merged in: ollama_base.export); any other run its GGUF files
    (export.export_stage). Returns the ExportResult."""
    run = Run.open(run)
    if base is None and run.ollama_base:
        from ollama_ft.ollama_base.export import export_ollama_run

        return export_ollama_run(run, merged=bool(run.setting("merged")) if merged is None
                                 else merged, log=log)
    from ollama_ft.export import export_stage

    return export_stage(run, quants=quants, adapter_only=adapter_only, log=log, base=base,
                        threads=threads)


def modelfile_for_run(run, *, system: str | None = None, overrides=None, template_file=None,
                      quant=None, adapter: bool = False, merged: bool | None = None):
    """The run's Modelfile: its chat format (Run.chat_format_name), max_len, served quant and
    the base's context length. `adapter`: FROM the base GGUF and ADAPTER the LoRA GGUF
    (`export --adapter-only`) instead of the merged GGUF. A run on an Ollama base: FROM that
    model with its own TEMPLATE, + ADAPTER (or the merged blob)."""
    from ollama_ft.ollama.templates import TemplateError, build_modelfile
    from ollama_ft.quants import quant_names
    from ollama_ft.run import ADAPTER_GGUF, gguf_name

    run = Run.open(run)
    if run.ollama_base:
        from ollama_ft.ollama_base import modelfile
        from ollama_ft.ollama_base.resolve import of_run

        ob = of_run(run)[0]
        if template_file is not None:
            raise TemplateError(f"{run.dir}: trained on the TEMPLATE of {ob.name}; a "
                                "--template of your own would not be what training saw")
        if merged is None:
            merged = bool(run.setting("merged"))
        return modelfile.build(ob, max_len=run.setting("max_len"), merged=merged,
                               system=system, overrides=overrides)
    if template_file is None:
        chat_format = run.chat_format_name()
    else:  # the format's stops and defaults still apply, when the run names one
        entry = run.catalog_entry()
        chat_format = run.train.get("chat_format") or run.setting("chat_format") or \
            (entry.chat_format if entry else None)
    quant = quant or run.served_quant(adapter)
    from_ = "./" + gguf_name(quant_names(quant)[0], base=True) if adapter else None
    return build_modelfile(chat_format, quant=quant, max_len=run.setting("max_len"),
                           base_context=run.base_context(), system=system, overrides=overrides,
                           template_file=template_file, from_=from_,
                           adapter="./" + ADAPTER_GGUF if adapter else None)


def modelfile_stage(run, *, system: str | None = None, overrides=None, template_file=None,
                    quant=None, name: str | None = None, adapter: bool = False,
                    merged: bool | None = None, log=print):
    """Write RUN/Modelfile for the run (SYSTEM from training when every example shared one)."""
    from ollama_ft.ollama.templates import write_modelfile
    from ollama_ft.quants import parse_quants

    run = Run.open(run)
    if system is None:
        system = run.train.get("system_prompt")
    if quant:
        quant = parse_quants(quant)[0].name
    mf = modelfile_for_run(run, system=system, overrides=overrides, template_file=template_file,
                           quant=quant, adapter=adapter, merged=merged)
    name = name or run.name
    path = write_modelfile(run.dir, mf, header=f"ollama create {name} -f Modelfile")
    log(f"Modelfile: {path}")
    return mf, path


def register_stage(run, name: str | None = None, *, host: str | None = None, log=print,
                   **modelfile_args):
    from ollama_ft.ollama.client import AdapterRefused, register
    from ollama_ft.ollama.names import parse_name

    run = Run.open(run)
    name = parse_name(name or run.name).short  # validated before anything is sent
    mf, _ = modelfile_stage(run, name=name, log=log, **modelfile_args)
    try:
        result = register(run.dir, mf, name, host=host, log=log,
                          expected=_expected(run, mf, modelfile_args.get("template_file")))
    except AdapterRefused as e:
        if not run.ollama_base:
            raise
        # Ollama 0.34.1 and later create no adapter models: the base with the LoRA merged in
        log(f"the daemon refused the adapter form ({e.reason}); registering a merged model")
        from ollama_ft.ollama_base.export import export_ollama_run

        export_ollama_run(run, merged=True, log=log)
        mf, _ = modelfile_stage(run, name=name, log=log, **{**modelfile_args, "merged": True})
        result = register(run.dir, mf, name, host=host, log=log,
                          expected=_expected(run, mf, modelfile_args.get("template_file")))
    run.record("register", {
        "name": result.name, "host": result.host, "ollama_version": result.version,
        "from": mf.from_, "adapter": mf.adapter,
        "uploaded": result.uploaded, "skipped": result.skipped, "seconds": result.seconds,
        "reply": result.reply[:200],
        "verification": result.verification.as_report() if result.verification else None})
    log(f"\n  ollama run {result.name}\n")
    return result


def _expected(run: Run, mf, template_file):
    """What training renders, for register's check of what the daemon renders."""
    from ollama_ft.ollama.verify import Expected

    base = run.export.get("base_path") or run.train.get("base_path")  # export --base: moved
    tokenizer = Path(base) / "tokenizer.json" if base else None
    if run.ollama_base:  # trained on the daemon's own TEMPLATE
        from ollama_ft.ollama_base.resolve import of_run

        return Expected(of_run(run)[1], tokenizer, mf.system)
    fmt = None if template_file else run.chat_format_name()
    return Expected(fmt, tokenizer, mf.system)
