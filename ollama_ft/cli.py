"""`ollama-ft` command line. Thin: parse, build a config, call one stage function, print."""

from __future__ import annotations

import sys

import click

from ollama_ft import __version__
from ollama_ft.errors import OllamaFtError
from ollama_ft.quants import DEFAULT_QUANT, QUANT_TYPES


class Group(click.Group):
    """Prints OllamaFtError without a traceback and exits non-zero."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except OllamaFtError as e:
            click.secho(f"error: {e}", fg="red", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("\naborted", err=True)
            sys.exit(130)


def _echo(msg: str = "") -> None:
    click.echo(msg, err=True)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ollama-ft")
def main():
    """Fine-tune DeepSeek bases with LoRA and run them in Ollama."""


# --- train -----------------------------------------------------------------------------------
def _flag(fld):
    """The click option of one RunConfig field, from its type and metadata (config._f)."""
    flag = "--" + fld.name.replace("_", "-")
    meta = fld.metadata
    help_text = meta.get("help", "")
    if meta.get("choices"):
        help_text += f" One of {', '.join(meta['choices'])}."
    if fld.default not in (None, "", -1) and "bool" not in fld.type and "default" not in help_text:
        help_text += f" (default {fld.default})"
    if "bool" in fld.type:
        return click.option(f"{flag}/--no-{flag[2:]}", default=None,
                            help=f"{help_text} (default {'on' if fld.default else 'off'})")
    kind = {"file": click.Path(dir_okay=False), "dir": click.Path(file_okay=False)}
    typ = kind.get(meta.get("path")) or (int if fld.type.startswith("int") else
                                         float if fld.type.startswith("float") else None)
    return click.option(flag, type=typ, help=help_text)


def _train_options(f):
    """Every RunConfig field as a flag (its help, type and default from config.py), and
    --config."""
    import dataclasses

    from ollama_ft.config import RunConfig

    for fld in reversed([x for x in dataclasses.fields(RunConfig) if x.name != "extra"]):
        f = _flag(fld)(f)
    return click.option("--config", "config_file", type=click.Path(dir_okay=False),
                        help="YAML file with the same keys as the flags; flags win.")(f)


@main.command()
@_train_options
@click.option("--host", help="Ollama URL for an ollama:NAME base and for registering (default "
              "$OLLAMA_HOST or 127.0.0.1:11434).")
@click.option("--dry-run", is_flag=True, help="Print the memory plan (weights, LoRA, optimizer, "
              "activations, loss) and whether it fits; train nothing.")
def train(config_file, host, dry_run, **flags):
    """Fine-tune a LoRA adapter on your data (then export and register)."""
    from ollama_ft.config import build_config
    from ollama_ft.memplan import preflight
    from ollama_ft.pipeline import run_pipeline

    cfg = build_config(config_file, **flags)
    if preflight(cfg, dry_run=dry_run, log=_echo):  # a run that cannot fit stops here
        return
    run_pipeline(cfg, log=_echo, host=host)


# --- data ------------------------------------------------------------------------------------
@main.group()
def data():
    """Inspect training data."""


@data.command("check")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--base", required=True, help="The base whose tokenizer and chat format to use "
              "(as train's --base, ollama:NAME too).")
@click.option("--format", "shape", help="Data format (default: detected).")
@click.option("--chat-format", help="Force a chat format.")
@click.option("--max-len", type=int, default=2048, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--host", help="Ollama URL for an ollama:NAME base (default $OLLAMA_HOST).")
def data_check(file, base, shape, chat_format, max_len, as_json, host):
    """Check FILE: format, rejects, duplicates, token lengths, truncation."""
    import json

    from ollama_ft.config import RunConfig
    from ollama_ft.data.check import check_data
    from ollama_ft.hub import resolve_base
    from ollama_ft.train.trainer import load_tokenizer

    resolved = resolve_base(base, chat_format=chat_format, host=host, log=_echo)
    tokenizer = load_tokenizer(resolved, RunConfig())
    _, _, report = check_data(file, tokenizer, resolved.chat_format, max_len, shape)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2, ensure_ascii=False))
    else:
        click.echo("\n".join(report.summary_lines()))


# --- models ----------------------------------------------------------------------------------
def _table(rows) -> None:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        cells = "  ".join(str(c).ljust(w) for c, w in zip(r, widths))
        click.echo((cells + ("  " + r[-1] if r[-1] else "")).rstrip())


@main.command()
@click.option("--host", help="Also list this Ollama's models (default $OLLAMA_HOST or "
              "127.0.0.1:11434).")
def models(host):
    """List the DeepSeek bases ollama-ft knows by alias, and your Ollama's models (each usable
    as --base ollama:NAME, or why not)."""
    from ollama_ft.catalog import CATALOG
    from ollama_ft.errors import BaseModelError
    from ollama_ft.ollama.daemon import list_models

    rows = [("ALIAS", "HUGGING FACE REPO", "ARCH", "CHAT FORMAT", "SIZE", "")]
    for m in CATALOG:
        rows.append((m.alias, m.repo_id, m.architecture, m.chat_format, m.params,
                     "" if m.supported else "(not yet)"))
    _table(rows)
    try:
        url, daemon = list_models(host)
    except BaseModelError as e:
        click.echo(f"\nOllama: {e}")
        return
    click.echo(f"\nOllama at {url}: {len(daemon)} model(s)")
    if daemon:
        rows = [("--BASE", "ARCH", "QUANT", "SIZE", "")]
        for m in daemon:
            size = f"{m['size'] / 1e9:.1f} GB" if m.get("size") else "?"
            rows.append((f"ollama:{m['name']}", m.get("architecture") or "?", m.get("quant") or "?",
                         size, f"(cannot be a base: {m['base']})" if m["base"] else ""))
        _table(rows)


# --- export / modelfile / register -------------------------------------------------------------
@main.command()
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--quant", help=f"GGUF type(s), comma-separated: {', '.join(QUANT_TYPES)} "
              "(default: the run's quant).")
@click.option("--adapter-only", is_flag=True, help="Write adapter.gguf (LoRA) plus the base GGUF.")
@click.option("--base", "base_dir", type=click.Path(file_okay=False), help="The base folder, if it moved.")
@click.option("--threads", type=int, help="CPU threads (default: all cores).")
def export(run, quant, adapter_only, base_dir, threads):
    """Merge the run's adapter into its base and write GGUF files (RUN/model-<type>.gguf)."""
    from ollama_ft.pipeline import export_run

    result = export_run(run, quants=quant, adapter_only=adapter_only, log=_echo, base=base_dir,
                        threads=threads)
    for line in result.summary_lines():
        click.echo(line)


@main.command("eval")
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--eval-data", type=click.Path(dir_okay=False),
              help="Held-out examples (default: the run's eval data or eval split).")
@click.option("--quant", help="Which exported GGUF to measure (default: the run's exported quant).")
@click.option("--max-new-tokens", type=int, default=128, show_default=True,
              help="Longest greedy answer.")
@click.option("--limit", type=int, help="Only the first N held-out examples.")
@click.option("--threads", type=int, help="CPU threads (default: all cores).")
def eval_cmd(run, eval_data, quant, max_new_tokens, limit, threads):
    """Compare base and fine-tune through llama.cpp on the exported GGUF: held-out loss,
    perplexity, exact match and ROUGE-L of greedy answers (RUN/eval.md, eval.png)."""
    from ollama_ft.evaluation import eval_stage

    r = eval_stage(run, eval_data=eval_data, quant=quant, max_new_tokens=max_new_tokens,
                   limit=limit, log=_echo, threads=threads)
    for key in ("base", "fine_tuned"):
        m = r[key]
        click.echo(f"{key.replace('_', '-'):>10}: loss {m['loss']:.4f}  perplexity "
                   f"{m['perplexity']:.2f}  exact match {m['exact_match']:.1%}  "
                   f"ROUGE-L {m['rouge_l']:.3f}  ({m['count']} examples)")


@main.command()
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--out", type=click.Path(file_okay=False), help="Folder (default RUN/merged).")
def merge(run, out):
    """Write the merged model (base + adapter) as safetensors, for other tools."""
    from ollama_ft.export import merge_stage

    result = merge_stage(run, out_dir=out, log=_echo)
    click.echo(str(getattr(result, "out_dir", result)))


def _modelfile_options(f):
    for opt in reversed([
        click.option("--param", "params", multiple=True, help="NAME=VALUE PARAMETER override "
                     "(repeatable; stop adds a stop)."),
        click.option("--template", "template_file", type=click.Path(dir_okay=False),
                     help="Your own Go TEMPLATE file instead of the family's."),
        click.option("--system", help="SYSTEM prompt (default: the one training used for every "
                     "example, if any)."),
        click.option("--quant", help="Which exported GGUF the Modelfile uses (default: the "
                     "run's first --quant)."),
        click.option("--adapter", is_flag=True, help="FROM the base GGUF with ADAPTER "
                     "adapter.gguf (`export --adapter-only`) instead of the merged GGUF: one "
                     "base blob in Ollama shared by every adapter of that base."),
    ]):
        f = opt(f)
    return f


@main.command()
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--name", help="Model name for the `ollama create` hint (default: the run's).")
@_modelfile_options
def modelfile(run, name, params, template_file, system, quant, adapter):
    """Write RUN/Modelfile (TEMPLATE, stops, parameters) and print it."""
    from ollama_ft.ollama.templates import parse_overrides
    from ollama_ft.pipeline import modelfile_stage

    _, path = modelfile_stage(run, system=system, overrides=parse_overrides(params),
                              template_file=template_file, quant=quant, name=name,
                              adapter=adapter, log=_echo)
    click.echo(path.read_text(encoding="utf-8"), nl=False)


@main.command()
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--name", help="NAME[:TAG] in Ollama (default: the run's name).")
@click.option("--host", help="Ollama URL (default $OLLAMA_HOST or 127.0.0.1:11434).")
@_modelfile_options
@click.option("--merged", is_flag=True, default=None, help="A run on an ollama:NAME base: the "
              "base with the LoRA merged in instead of FROM base + ADAPTER.")
def register(run, name, host, params, template_file, system, quant, adapter, merged):
    """Register the run's GGUF with Ollama (or the bridge); check what it feeds the model."""
    from ollama_ft.ollama.templates import parse_overrides
    from ollama_ft.pipeline import export_run, register_stage

    if merged:
        export_run(run, merged=True, log=_echo)
    register_stage(run, name, host=host, system=system, overrides=parse_overrides(params),
                   template_file=template_file, quant=quant, adapter=adapter, log=_echo,
                   merged=merged or None)


# --- serve -----------------------------------------------------------------------------------
@main.command()
@click.option("--listen", help="HOST:PORT (default 127.0.0.1:11435, or OLLAMA_FT_LISTEN).")
@click.option("--api-key", help="Require Authorization: Bearer KEY (needed beyond loopback; "
              "or OLLAMA_FT_API_KEY).")
@click.option("--home", type=click.Path(file_okay=False), help="Model store (default "
              "$OLLAMA_FT_HOME or ~/.ollama-ft).")
@click.option("--upstream", help="Proxy mode: forward the Ollama API to this daemon (default: "
              "the daemon at OLLAMA_HOST, if one answers).")
@click.option("--embedded", is_flag=True, help="Serve models here even if a daemon answers.")
@click.option("--data-dir", "data_dirs", multiple=True, type=click.Path(file_okay=False),
              help="A folder training jobs may read data and local bases from (repeatable; "
              "otherwise jobs use files uploaded to /api/ft/uploads).")
@click.option("--allow-remote-code", is_flag=True, help="Let jobs set trust_remote_code and "
              "allow_pickle (both run code from model files).")
def serve(listen, api_key, home, upstream, embedded, data_dirs, allow_remote_code):
    """Serve the Ollama API (llama.cpp engine, or a proxy to Ollama) plus training jobs."""
    from ollama_ft.serve.server import serve as run_server

    run_server(listen, api_key, home, upstream=upstream, embedded=embedded, log=_echo,
               data_dirs=data_dirs, allow_remote_code=allow_remote_code)


@main.command()
@click.option("--home", type=click.Path(file_okay=False), help="Store (default $OLLAMA_FT_HOME "
              "or ~/.ollama-ft).")
@click.option("--json", "as_json", is_flag=True)
def jobs(home, as_json):
    """List the bridge's training jobs (running, finished, interrupted)."""
    import json
    import time

    from ollama_ft.serve.jobs import read_jobs
    from ollama_ft.serve.store import default_root

    found = read_jobs(home or default_root())
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    if not found:
        click.echo("no jobs")
        return
    click.echo(f"{'ID':<24} {'STATE':<12} {'NAME':<20} {'STEP':>11} {'LOSS':>8}  CREATED")
    for j in found:
        p = j.get("progress") or {}
        step = f"{p.get('step', 0)}/{p.get('max_steps', '?')}" if p else "-"
        loss = f"{p['loss']:.4f}" if isinstance(p.get("loss"), (int, float)) else "-"
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(j["created_at"]))
        click.echo(f"{j['id']:<24} {j['state']:<12} {str(j['config'].get('name'))[:20]:<20} "
                   f"{step:>11} {loss:>8}  {created}")


@main.command()
@click.option("--host", help="Ollama URL to check (default $OLLAMA_HOST or 127.0.0.1:11434).")
def doctor(host):
    """Check torch and its device, llama.cpp, disk, Ollama and the Hub; say what to fix."""
    from ollama_ft.doctor import run_checks

    checks = run_checks(host)
    for c in checks:
        mark = click.style("ok  ", fg="green") if c.ok else click.style(
            "FAIL" if c.required else "warn", fg="red" if c.required else "yellow")
        click.echo(f"{mark} {c.name:<20} {c.detail}")
        if not c.ok and c.fix:
            click.echo(f"     {'':<20} -> {c.fix}")
    if any(c.required and not c.ok for c in checks):
        sys.exit(1)


# --- openwebui -------------------------------------------------------------------------------
@main.group()
def openwebui():
    """Open WebUI: the trainer as a model in its chat (a Pipe function)."""


@openwebui.command("install")
@click.option("--url", envvar="OPEN_WEBUI_URL", default="http://127.0.0.1:8080", show_default=True,
              help="Open WebUI's address (or OPEN_WEBUI_URL).")
@click.option("--token", envvar="OPEN_WEBUI_TOKEN", help="An admin's API key or session token "
              "(or OPEN_WEBUI_TOKEN).")
@click.option("--print", "print_only", is_flag=True, help="Only print the Pipe's source, to paste "
              "into Admin > Functions > New Function.")
@click.option("--bridge-url", help="Valve: the bridge as Open WebUI's server reaches it "
              "(default http://127.0.0.1:11435).")
@click.option("--bridge-api-key", help="Valve: the bridge's --api-key.")
@click.option("--base", help="Valve: the base when a message names none (default deepseek-r1:1.5b).")
@click.option("--epochs", type=float, help="Valve: epochs when a message says none (default 3).")
@click.option("--quant", help=f"Valve: GGUF type(s) to export (default {DEFAULT_QUANT}).")
def openwebui_install(url, token, print_only, bridge_url, bridge_api_key, base, epochs, quant):
    """Install the "ollama-ft trainer" Pipe into a running Open WebUI (or --print it)."""
    from ollama_ft.openwebui.install import install_pipe, pipe_source

    if print_only:
        click.echo(pipe_source(), nl=False)
        return
    r = install_pipe(url, token, {"bridge_url": bridge_url, "bridge_api_key": bridge_api_key,
                                  "default_base": base, "epochs": epochs, "quant": quant})
    click.echo(f"{'installed' if r.created else 'updated'} the Pipe {r.function_id} in {r.url}: "
               f"it is on, and shows in the model list as '{r.name}'")
    shown = {k: ("***" if k == "bridge_api_key" and v else v) for k, v in r.valves.items()}
    if shown:
        click.echo("valves: " + ", ".join(f"{k}={v}" for k, v in shown.items()))


# --- demo ------------------------------------------------------------------------------------
@main.command()
@click.option("--workdir", type=click.Path(file_okay=False), default="runs/demo", show_default=True)
@click.option("--steps", type=int, default=None, help="Training steps (default: the demo's own).")
@click.option("--name", default="ollama-ft-demo", show_default=True, help="Model name in Ollama.")
@click.option("--host", help="Ollama URL (default $OLLAMA_HOST or 127.0.0.1:11434).")
@click.option("--bridge-listen", default="127.0.0.1:11435", show_default=True,
              help="Where to start the bridge when no Ollama daemon answers.")
def demo(workdir, steps, name, host, bridge_listen):
    """Fine-tune a small DeepSeek-R1-shaped model, run it in Ollama, compare its answers."""
    from ollama_ft.demo import run_demo

    run_demo(workdir, steps=steps, name=name, host=host, bridge_listen=bridge_listen, log=_echo)


if __name__ == "__main__":  # pragma: no cover
    main()
