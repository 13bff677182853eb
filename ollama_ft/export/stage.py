"""The export stage: base checkpoint + the run's LoRA adapter -> GGUF files in the run dir.

`export_stage(run_dir, quants=..., adapter_only=False)` is what `ollama-ft export RUN`, the
export step of `ollama-ft train` and the bridge service call. It writes, in RUN/:

  model-<type>.gguf   merged model, one per requested type (f16, q8_0, q4_k_m, ...)
  adapter.gguf        with adapter_only: the LoRA as a llama.cpp adapter GGUF, and
  base-<type>.gguf    the base model (unmerged) it applies to, written once per base
  report.json         its `export` section

Every file appears under its final name only when complete (written under a dot-prefixed
temporary name, then renamed); an interrupted export leaves no half-written model-*.gguf.
`merge_stage(run_dir)` writes RUN/merged/ (merged safetensors) for people who want them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from ollama_ft.export.errors import DiskSpaceError, RunDirError
from ollama_ft.rundir import RUN_FILES, read_json, update_report

TMP_PATTERN = re.compile(r"^\.(model-.+\.gguf|adapter\.gguf|base-.+\.gguf|merged|export-f16\.gguf)"
                         r"\.tmp-(\d+)$")


@dataclass
class ExportResult:
    run_dir: Path
    files: dict[str, Path]  # "f16"/"q4_k_m"/... -> model-<type>.gguf; "adapter"; "base-<type>"
    sizes: dict[str, int]
    adapter_only: bool
    runtime_s: float
    pre_tokenizer: str
    add_bos: bool
    chat_template_source: str
    reused: list[str] = field(default_factory=list)  # outputs kept from an earlier export

    def summary_lines(self) -> list[str]:
        lines = [f"{p.name}  {self.sizes[k] / 2**20:,.1f} MiB" + ("  (kept)" if k in self.reused else "")
                 for k, p in self.files.items()]
        lines.append(f"tokenizer.ggml.pre = {self.pre_tokenizer}, add_bos = {self.add_bos}, "
                     f"chat template from {self.chat_template_source}; {self.runtime_s:.1f} s")
        return lines


@dataclass
class RunInfo:
    run_dir: Path
    name: str
    base_path: Path
    base_spec: str | None
    repo_id: str | None
    chat_format: str
    quant: str | None
    trained_on: str | None


def _run_yaml(run_dir: Path) -> dict:
    import yaml

    path = run_dir / RUN_FILES["config"]
    return (yaml.safe_load(path.read_text(encoding="utf-8")) or {}) if path.is_file() else {}


def read_run(run_dir: Path, base: str | Path | None = None) -> RunInfo:
    import yaml

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: no such run directory; pass the folder `ollama-ft train` "
                          "wrote (runs/NAME)")
    report = read_json(run_dir / RUN_FILES["report"], {}) or {}
    train = report.get("train") or {}
    cfg = {}
    if (run_dir / RUN_FILES["config"]).is_file():
        cfg = yaml.safe_load((run_dir / RUN_FILES["config"]).read_text(encoding="utf-8")) or {}
    if not train.get("base_path") and base is None:
        raise RunDirError(f"{run_dir / RUN_FILES['report']}: no train section with base_path; "
                          "train this run first (`ollama-ft train`), or pass the base checkpoint "
                          "folder explicitly")
    base_path = Path(base) if base is not None else Path(train["base_path"])
    if not (base_path / "config.json").is_file():
        raise RunDirError(f"{base_path}: the base checkpoint of {run_dir} is not there (no "
                          "config.json); restore it or pass its new folder explicitly")
    chat_format = train.get("chat_format") or cfg.get("chat_format")
    if chat_format is None:
        from ollama_ft.hub import inspect_checkpoint

        chat_format = inspect_checkpoint(str(base_path), base_path, "local", None, None).chat_format.name
    from ollama_ft.chat_formats import FORMATS

    if chat_format not in FORMATS and not chat_format.startswith("ollama:"):
        raise RunDirError(f"{run_dir / RUN_FILES['report']}: train.chat_format {chat_format!r} "
                          f"is not one of {', '.join(FORMATS)}")
    return RunInfo(run_dir, str(cfg.get("name") or run_dir.name), base_path,
                   train.get("base") or cfg.get("base"), train.get("repo_id"), chat_format,
                   cfg.get("quant"), str(train.get("base_path")) if train.get("base_path") else None)


def _general(info: RunInfo, base_config: dict, n_params: int):
    import gguf

    from ollama_ft.export.gguf import GeneralMetadata

    repo = info.repo_id
    if not repo and info.base_spec and re.fullmatch(r"[\w.-]+/[\w.-]+", info.base_spec) \
            and not Path(info.base_spec).exists():
        repo = info.base_spec
    base_name = repo.split("/")[-1] if repo else info.base_path.name
    return GeneralMetadata(
        name=info.name, basename=base_name, finetune=info.name,
        size_label=gguf.utility.size_label(n_params, n_params, 0, 0),
        license=_license(info.base_path),
        base_model_name=base_name, base_model_org=repo.split("/")[0] if repo else None,
        base_model_repo_url=f"https://huggingface.co/{repo}" if repo else None)


def _license(base_path: Path) -> str | None:
    """The `license:` of the model card's front matter, if the base has one."""
    readme = base_path / "README.md"
    if not readme.is_file():
        return None
    text = readme.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return None
    front = text[3:].split("\n---", 1)[0]
    m = re.search(r"^license:\s*['\"]?([^'\"\n]+)", front, re.M)
    return m.group(1).strip() if m else None


def _fingerprint(base_path: Path) -> str:
    h = hashlib.sha256(str(base_path.resolve()).encode())
    for p in sorted(base_path.iterdir()):
        if p.is_file() and (p.suffix in (".safetensors", ".json")):
            st = p.stat()
            h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def clean_stale_temp_files(run_dir: Path) -> list[Path]:
    """Remove temp files of earlier exports that died (their process is gone)."""
    removed = []
    for p in Path(run_dir).iterdir():
        m = TMP_PATTERN.match(p.name)
        if not m:
            continue
        pid = int(m.group(2))
        if pid != os.getpid():
            try:
                os.kill(pid, 0)
                continue  # still running: not ours to touch
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def check_disk(run_dir: Path, needs: dict[str, int], log=print) -> None:
    free = shutil.disk_usage(run_dir).free
    total = sum(needs.values())
    if total > free:
        items = ", ".join(f"{k} ~{v / 2**30:.2f} GiB" for k, v in needs.items())
        raise DiskSpaceError(f"{run_dir}: not enough free disk space for the export: it needs "
                             f"about {total / 2**30:.2f} GiB ({items}) and "
                             f"{free / 2**30:.2f} GiB are free; free some space, export fewer "
                             "types (--quant), or move the run to a bigger disk")


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _peak_rss_mb() -> float | None:
    try:
        import resource

        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    except Exception:  # pragma: no cover - not on every platform
        return None


def export_stage(run_dir: str | Path, quants=None, adapter_only: bool = False, log=print,
                 base: str | Path | None = None, threads: int | None = None,
                 record: bool = True, with_adapter: bool = True,
                 merged: bool | None = None) -> ExportResult:
    """Write the run's GGUF files (see the module docstring). Returns an ExportResult.
    record=False leaves report.json's export section as it was, and adapter_only with
    with_adapter=False writes only the base GGUF (eval's base, for itself, without changing
    what the run's export says it made)."""
    from ollama_ft.chat_formats import FORMATS
    from ollama_ft.export.gguf import arch_spec, write_gguf
    from ollama_ft.export.merge import Checkpoint, MergedModel, load_adapter
    from ollama_ft.export.quantize import estimate_bytes, llama_quantize, parse_quants
    from ollama_ft.export.vocab import read_tokenizer

    t0 = time.perf_counter()
    report = read_json(Path(run_dir) / RUN_FILES["report"], {}) or {}
    from ollama_ft.ollama_base.resolve import of_run

    if base is None and of_run(report) is not None:  # an Ollama base: its blob is the base GGUF
        from ollama_ft.ollama_base.export import export_ollama_run

        if merged is None:
            merged = bool(_run_yaml(Path(run_dir)).get("merged"))
        return export_ollama_run(Path(run_dir), report, merged=merged, log=log)
    info = read_run(Path(run_dir), base)
    run_dir = info.run_dir
    types = parse_quants(quants if quants is not None else (info.quant or None))
    base_config = json.loads((info.base_path / "config.json").read_text(encoding="utf-8"))
    where = str(info.base_path)
    arch_spec(base_config, where)  # unsupported architectures stop here, before any work
    clean_stale_temp_files(run_dir)

    created: list[Path] = []  # temp files of this export, removed if it fails
    ckpt = adapter = None
    try:
        adapter = load_adapter(run_dir / RUN_FILES["adapter"])
        ckpt = Checkpoint(info.base_path)
        model = MergedModel(ckpt, adapter, trained_on=info.trained_on)
        fmt = FORMATS[info.chat_format]
        tok = read_tokenizer(info.base_path, int(base_config["vocab_size"]), fmt)
        n_params = ckpt.parameter_count()
        general = _general(info, base_config, n_params)
        n_vector = sum(math_prod(ckpt.info(n).shape) for n in ckpt.names()
                       if len(ckpt.info(n).shape) <= 1)
        n_matrix = n_params - n_vector
        prefix = "base" if adapter_only else "model"
        report = read_json(run_dir / RUN_FILES["report"], {}) or {}
        fingerprint = _fingerprint(info.base_path)
        previous = (report.get("export") or {}).get("base_fingerprint")

        outputs = {q.name: run_dir / f"{prefix}-{q.name}.gguf" for q in types}
        reused = []
        if adapter_only and previous == fingerprint:
            reused = [q.name for q in types if outputs[q.name].is_file()]
        todo = [q for q in types if q.name not in reused]
        needs = {outputs[q.name].name: estimate_bytes(q, n_matrix, n_vector, len(tok.tokens))
                 for q in todo}
        # llama.cpp quantizes from F16: the requested (or kept) F16 file, else an intermediate
        need_f16 = any(not q.direct for q in todo) and "f16" not in [q.name for q in types]
        if need_f16:
            from ollama_ft.export.quantize import QUANT_TYPES

            needs["F16 intermediate"] = estimate_bytes(QUANT_TYPES["f16"], n_matrix, n_vector,
                                                       len(tok.tokens))
        if adapter_only and with_adapter:
            needs["adapter.gguf"] = adapter.file.path.stat().st_size * 2 + 2**20
        check_disk(run_dir, needs, log)

        files: dict[str, Path] = {}
        sizes: dict[str, int] = {}
        timings: dict[str, float] = {}
        alpha_written = None
        if adapter_only and with_adapter:
            from ollama_ft.export.adapter import adapter_alpha, write_adapter_gguf

            alpha_written = adapter_alpha(adapter)[0]
            final = run_dir / "adapter.gguf"
            tmp = _tmp(final)
            created.append(tmp)
            t = time.perf_counter()
            sizes["adapter"] = write_adapter_gguf(tmp, adapter, ckpt, base_config, general, where)
            os.replace(tmp, final)
            files["adapter"] = final
            timings["adapter"] = round(time.perf_counter() - t, 2)
            log(f"  wrote {final.name} (LoRA adapter, {len(adapter.modules)} weights)")
        if adapter_only:
            model = MergedModel(ckpt, None)  # the base GGUFs carry no adapter
            general.finetune = None
            general.name = general.basename or info.name

        src = "base" if adapter_only else f"base + {run_dir / RUN_FILES['adapter']}"
        f16_source: Path | None = outputs["f16"] if "f16" in reused else None
        direct = sorted([q for q in todo if q.direct], key=lambda q: q.name != "f16")
        if need_f16:
            f16_source = run_dir / f".export-f16.gguf.tmp-{os.getpid()}"
            created.append(f16_source)
            t = time.perf_counter()
            write_gguf(f16_source, model, base_config, "F16", tok, general, where, log,
                       threads)
            timings["f16 intermediate"] = round(time.perf_counter() - t, 2)
        for q in direct:
            final = outputs[q.name]
            tmp = _tmp(final)
            created.append(tmp)
            t = time.perf_counter()
            log(f"  writing {final.name} ({src})")
            sizes[q.name] = write_gguf(tmp, model, base_config, q.gguf_type, tok, general,
                                       where, log, threads)
            os.replace(tmp, final)
            files[q.name] = final
            timings[q.name] = round(time.perf_counter() - t, 2)
            if q.name == "f16":
                f16_source = final
        for q in [q for q in todo if not q.direct]:
            final = outputs[q.name]
            tmp = _tmp(final)
            created.append(tmp)
            t = time.perf_counter()
            log(f"  quantizing {final.name} with llama.cpp")
            llama_quantize(f16_source, tmp, q, threads)
            os.replace(tmp, final)
            files[q.name] = final
            sizes[q.name] = final.stat().st_size
            timings[q.name] = round(time.perf_counter() - t, 2)
        for name in reused:
            files[name] = outputs[name]
            sizes[name] = outputs[name].stat().st_size
            log(f"  kept {outputs[name].name} (same base as before)")
        if need_f16 and f16_source is not None:
            f16_source.unlink(missing_ok=True)
    except BaseException:
        for p in created:
            try:
                p.unlink(missing_ok=True)
            except OSError:
                pass
        raise
    finally:
        if adapter is not None:
            adapter.close()
        if ckpt is not None:
            ckpt.close()

    ordered = {k: files[k] for k in ([q.name for q in types] + ["adapter"]) if k in files}
    result = ExportResult(run_dir, ordered, {k: sizes[k] for k in ordered}, adapter_only,
                          round(time.perf_counter() - t0, 2), tok.pre.name, tok.add_bos,
                          tok.chat_template_source, reused)
    if not record:
        return result
    update_report(run_dir, "export", {
        "base_path": str(info.base_path), "base_fingerprint": fingerprint,
        "adapter": str(run_dir / RUN_FILES["adapter"]), "adapter_only": adapter_only,
        "files": {k: p.name for k, p in ordered.items()}, "sizes": result.sizes,
        "timings_s": timings, "runtime_s": result.runtime_s, "peak_rss_mb": _peak_rss_mb(),
        "tokenizer_pre": tok.pre.name, "add_bos_token": tok.add_bos,
        "eot_token_id": tok.eot_id, "chat_template": tok.chat_template_source,
        "vocab_padding": tok.n_padding, "chat_format": info.chat_format,
        "adapter_lora_alpha": alpha_written,
    })
    return result


def math_prod(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


@dataclass
class MergeResult:
    run_dir: Path
    out_dir: Path
    files: list[Path]
    runtime_s: float


def merge_stage(run_dir: str | Path, out_dir: str | Path | None = None, log=print,
                base: str | Path | None = None) -> MergeResult:
    """Write base + adapter as merged safetensors to RUN/merged (or out_dir)."""
    from ollama_ft.export.merge import Checkpoint, MergedModel, load_adapter, write_merged_safetensors

    t0 = time.perf_counter()
    info = read_run(Path(run_dir), base)
    out = Path(out_dir) if out_dir else info.run_dir / "merged"
    adapter = load_adapter(info.run_dir / RUN_FILES["adapter"])
    ckpt = Checkpoint(info.base_path)
    try:
        model = MergedModel(ckpt, adapter, trained_on=info.trained_on)
        check_disk(out.parent if out.parent.exists() else info.run_dir,
                   {out.name: ckpt.nbytes() + 2**20}, log)
        log(f"merging {info.base_path} + {adapter.dir} -> {out}")
        files = write_merged_safetensors(model, out, log)
    finally:
        adapter.close()
        ckpt.close()
    result = MergeResult(info.run_dir, out, files, round(time.perf_counter() - t0, 2))
    update_report(info.run_dir, "merge", {"out_dir": str(out), "files": [f.name for f in files],
                                          "runtime_s": result.runtime_s})
    return result
