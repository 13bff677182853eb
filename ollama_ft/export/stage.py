"""The export stage: base checkpoint + the run's LoRA adapter -> GGUF files in the run dir.

`export_stage(run_dir, quants=..., adapter_only=False)` is what `ollama-ft export RUN`, the
export step of `ollama-ft train` and the bridge service call. It writes, in RUN/:

  model-<type>.gguf   merged model, one per requested type (quants.QUANT_TYPES)
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

from ollama_ft.errors import RunDirError
from ollama_ft.export.errors import DiskSpaceError
from ollama_ft.run import Run
from ollama_ft.rundir import temp_path

TMP_PATTERN = re.compile(r"^\.(model-.+\.gguf|adapter\.gguf|base-.+\.gguf|merged|export-f16\.gguf)"
                         r"\.tmp-(\d+)$")


@dataclass
class ExportResult:
    run_dir: Path
    files: dict[str, Path]  # quant name -> model-<type>.gguf; "adapter"; "base-<type>"
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
    """What export takes from a run: its name, base checkpoint and chat format."""
    run: Run
    base_path: Path
    chat_format: str

    @property
    def run_dir(self) -> Path:
        return self.run.dir

    @property
    def name(self) -> str:
        return self.run.name

    @property
    def trained_on(self) -> str | None:
        """The base folder training used (the adapter's record of it), None if unknown."""
        return self.run.train.get("base_path") or None


def read_run(run, base: str | Path | None = None) -> RunInfo:
    """The run (a Run or its folder) and its base checkpoint (`base` overrides train's)."""
    run = Run.open(run)
    base_path = run.base_path(base)
    return RunInfo(run, base_path, run.chat_format_name(base_path))


def _general(info: RunInfo, base_config: dict, n_params: int):
    import gguf

    from ollama_ft.export.gguf import GeneralMetadata

    repo, spec = info.run.repo_id, info.run.base_spec
    if not repo and spec and re.fullmatch(r"[\w.-]+/[\w.-]+", spec) and not Path(spec).exists():
        repo = spec
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


def _peak_rss_mb() -> float | None:
    try:
        import resource

        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    except Exception:  # pragma: no cover - not on every platform
        return None


def export_stage(run, quants=None, adapter_only: bool = False, log=print,
                 base: str | Path | None = None, threads: int | None = None) -> ExportResult:
    """Write the run's GGUF files (see the module docstring) and record them in report.json.
    `run`: a Run or its folder (of a Hugging Face base: pipeline.export_run sends runs on an
    Ollama base to ollama_base.export). Returns an ExportResult."""
    run = Run.open(run)
    if base is None and run.ollama_base:
        raise RunDirError(f"{run.dir}: trained on the Ollama model {run.ollama_base.get('name')}; "
                          "export it with `ollama-ft export` (pipeline.export_run)")
    job = plan_export(run, quants, adapter_only, base, log, with_adapter=adapter_only)
    result = job.execute(log, threads)
    run.record("export", job.record(result))
    return result


def export_base_gguf(run, quant: str, log=print, threads: int | None = None) -> Path:
    """base-<quant>.gguf alone (eval's base, for comparison): no adapter GGUF, and report.json
    keeps saying what the run's export made."""
    job = plan_export(Run.open(run), quant, True, None, log, with_adapter=False)
    return job.execute(log, threads).files[job.types[0].name]


def plan_export(run: Run, quants, adapter_only: bool, base, log, with_adapter: bool) -> "ExportJob":
    """What an export will write and from what, checked (architecture, disk space) before any
    file is written. The job holds the base checkpoint and adapter open until it runs."""
    from ollama_ft.chat_formats import FORMATS
    from ollama_ft.export.gguf import arch_spec
    from ollama_ft.export.merge import Checkpoint, MergedModel, load_adapter
    from ollama_ft.export.vocab import read_tokenizer
    from ollama_ft.quants import parse_quants

    info = read_run(run, base)
    types = parse_quants(quants if quants is not None else (run.setting("quant") or None))
    base_config = json.loads((info.base_path / "config.json").read_text(encoding="utf-8"))
    arch_spec(base_config, str(info.base_path))  # unsupported architectures stop here
    clean_stale_temp_files(run.dir)
    adapter = load_adapter(run.path("adapter"))
    try:
        ckpt = Checkpoint(info.base_path)
    except BaseException:
        adapter.close()
        raise
    job = ExportJob(info, types, adapter_only, with_adapter and adapter_only, base_config, ckpt,
                    adapter)
    try:  # the adapter is checked against the base first (a wrong --base says so)
        job.merged = MergedModel(ckpt, adapter, trained_on=info.trained_on)
        job.tok = read_tokenizer(info.base_path, int(base_config["vocab_size"]),
                                 FORMATS[info.chat_format])
        job.prepare(log)
    except BaseException:
        job.close()
        raise
    return job


@dataclass
class ExportJob:
    info: RunInfo
    types: list
    adapter_only: bool
    with_adapter: bool  # write adapter.gguf (adapter_only exports)
    base_config: dict
    ckpt: object
    adapter: object
    merged: object = None  # base + adapter (export.merge.MergedModel), fit checked
    tok: object = None
    general: object = None
    fingerprint: str = ""
    outputs: dict = field(default_factory=dict)  # quant name -> final path
    reused: list = field(default_factory=list)  # outputs kept from an earlier export
    todo: list = field(default_factory=list)
    need_f16: bool = False  # llama.cpp quantizes from an F16 intermediate
    timings: dict = field(default_factory=dict)
    alpha_written: float | None = None

    def prepare(self, log) -> None:
        """Which files to write, which to keep, and whether the disk holds them."""
        from ollama_ft.export.quantize import estimate_bytes
        from ollama_ft.quants import QUANT_TYPES

        run, ckpt = self.info.run, self.ckpt
        n_params = ckpt.parameter_count()
        self.general = _general(self.info, self.base_config, n_params)
        n_vector = sum(math_prod(ckpt.info(n).shape) for n in ckpt.names()
                       if len(ckpt.info(n).shape) <= 1)
        n_matrix = n_params - n_vector
        prefix = "base" if self.adapter_only else "model"
        self.fingerprint = _fingerprint(self.info.base_path)
        self.outputs = {q.name: run.dir / f"{prefix}-{q.name}.gguf" for q in self.types}
        if self.adapter_only and run.export.get("base_fingerprint") == self.fingerprint:
            self.reused = [q.name for q in self.types if self.outputs[q.name].is_file()]
        self.todo = [q for q in self.types if q.name not in self.reused]
        n_tokens = len(self.tok.tokens)
        needs = {self.outputs[q.name].name: estimate_bytes(q, n_matrix, n_vector, n_tokens)
                 for q in self.todo}
        self.need_f16 = any(not q.direct for q in self.todo) and "f16" not in self.outputs
        if self.need_f16:
            needs["F16 intermediate"] = estimate_bytes(QUANT_TYPES["f16"], n_matrix, n_vector,
                                                       n_tokens)
        if self.with_adapter:
            needs["adapter.gguf"] = self.adapter.file.path.stat().st_size * 2 + 2**20
        check_disk(run.dir, needs, log)

    def close(self) -> None:
        self.adapter.close()
        self.ckpt.close()

    def execute(self, log, threads: int | None) -> ExportResult:
        """Write the files (each under a temporary name, then renamed); on failure remove this
        export's temporary files. Closes the job."""
        t0 = time.perf_counter()
        created: list[Path] = []
        try:
            files, sizes = self._write(created, log, threads)
        except BaseException:
            for p in created:
                try:
                    p.unlink(missing_ok=True)
                except OSError:
                    pass
            raise
        finally:
            self.close()
        ordered = {k: files[k] for k in ([q.name for q in self.types] + ["adapter"]) if k in files}
        return ExportResult(self.info.run_dir, ordered, {k: sizes[k] for k in ordered},
                            self.adapter_only, round(time.perf_counter() - t0, 2),
                            self.tok.pre.name, self.tok.add_bos, self.tok.chat_template_source,
                            self.reused)

    def _write(self, created: list[Path], log, threads):
        from ollama_ft.export.merge import MergedModel

        run_dir, files, sizes = self.info.run_dir, {}, {}
        model = self.merged
        if self.with_adapter:
            files["adapter"], sizes["adapter"] = self._write_adapter(created, log)
        if self.adapter_only:
            model = MergedModel(self.ckpt, None)  # the base GGUFs carry no adapter
            self.general.finetune = None
            self.general.name = self.general.basename or self.info.name
        src = "base" if self.adapter_only else f"base + {self.info.run.path('adapter')}"
        f16_source: Path | None = self.outputs["f16"] if "f16" in self.reused else None
        if self.need_f16:
            f16_source = run_dir / f".export-f16.gguf.tmp-{os.getpid()}"
            created.append(f16_source)
            self._timed("f16 intermediate", lambda: self._gguf(f16_source, model, "F16", log, threads))
        for q in sorted([q for q in self.todo if q.direct], key=lambda q: q.name != "f16"):
            log(f"  writing {self.outputs[q.name].name} ({src})")
            files[q.name], sizes[q.name] = self._finish(q.name, created, lambda tmp, q=q: self._gguf(
                tmp, model, q.gguf_type, log, threads))
            if q.name == "f16":
                f16_source = files[q.name]
        for q in [q for q in self.todo if not q.direct]:
            from ollama_ft.export.quantize import llama_quantize

            log(f"  quantizing {self.outputs[q.name].name} with llama.cpp")
            files[q.name], sizes[q.name] = self._finish(
                q.name, created, lambda tmp, q=q: llama_quantize(f16_source, tmp, q, threads))
        for name in self.reused:
            files[name], sizes[name] = self.outputs[name], self.outputs[name].stat().st_size
            log(f"  kept {self.outputs[name].name} (same base as before)")
        if self.need_f16 and f16_source is not None:
            f16_source.unlink(missing_ok=True)
        return files, sizes

    def _gguf(self, path: Path, model, gguf_type: str, log, threads) -> int:
        from ollama_ft.export.gguf import write_gguf

        return write_gguf(path, model, self.base_config, gguf_type, self.tok, self.general,
                          str(self.info.base_path), log, threads)

    def _timed(self, key: str, fn):
        t = time.perf_counter()
        out = fn()
        self.timings[key] = round(time.perf_counter() - t, 2)
        return out

    def _finish(self, key: str, created: list[Path], write) -> tuple[Path, int]:
        """write(tmp) under a temporary name, then rename it to the final one."""
        final = self.outputs[key]
        tmp = temp_path(final)
        created.append(tmp)
        self._timed(key, lambda: write(tmp))
        os.replace(tmp, final)
        return final, final.stat().st_size

    def _write_adapter(self, created: list[Path], log) -> tuple[Path, int]:
        from ollama_ft.export.adapter import adapter_alpha, write_adapter_gguf

        self.alpha_written = adapter_alpha(self.adapter)[0]
        final = self.info.run.adapter_gguf
        tmp = temp_path(final)
        created.append(tmp)
        size = self._timed("adapter", lambda: write_adapter_gguf(
            tmp, self.adapter, self.ckpt, self.base_config, self.general, str(self.info.base_path)))
        os.replace(tmp, final)
        log(f"  wrote {final.name} (LoRA adapter, {len(self.adapter.modules)} weights)")
        return final, size

    def record(self, result: ExportResult) -> dict:
        """report.json's export section."""
        tok = self.tok
        return {
            "base_path": str(self.info.base_path), "base_fingerprint": self.fingerprint,
            "adapter": str(self.info.run.path("adapter")), "adapter_only": self.adapter_only,
            "files": {k: p.name for k, p in result.files.items()}, "sizes": result.sizes,
            "timings_s": self.timings, "runtime_s": result.runtime_s,
            "peak_rss_mb": _peak_rss_mb(), "tokenizer_pre": tok.pre.name,
            "add_bos_token": tok.add_bos, "eot_token_id": tok.eot_id,
            "chat_template": tok.chat_template_source, "vocab_padding": tok.n_padding,
            "chat_format": self.info.chat_format, "adapter_lora_alpha": self.alpha_written}


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
    from ollama_ft.export.merge import (
        Checkpoint,
        MergedModel,
        load_adapter,
        write_merged_safetensors,
    )

    t0 = time.perf_counter()
    info = read_run(run_dir, base)
    out = Path(out_dir) if out_dir else info.run_dir / "merged"
    adapter = load_adapter(info.run.path("adapter"))
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
    info.run.record("merge", {"out_dir": str(out), "files": [f.name for f in files],
                              "runtime_s": result.runtime_s})
    return result
