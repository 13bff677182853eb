"""A run directory, read and written through one object.

`Run.open(RUN)` is the only reader of RUN/run.yaml (the resolved config train wrote) and
RUN/report.json (each stage's section); every stage after training takes a `Run`:

    run.config          the RunConfig of run.yaml (None when the run has none)
    run.setting(key)    one run.yaml value, None when run.yaml lacks it
    run.train, .export, .register, .eval, .ollama_base
                        report.json's sections (empty dicts when not there yet)
    run.record(s, v)    write one section (report.json stays whole: temporary file + rename)
    run.base_path()     the base checkpoint training used, checked to be there
    run.chat_format_name()
                        the one rule for the run's chat format (see the method)
    run.gguf(quant), run.adapter_gguf, run.served_quant()
                        the GGUF files' names, and which quant the run is served as

report.json is read again only when the file changed (mtime and size), so a pipeline that
passes one Run along reads each fact from disk once, and still sees what a stage wrote.
The file primitives (whole writes, RUN_FILES) are in rundir.py.
"""

from __future__ import annotations

import json
from pathlib import Path

from ollama_ft import catalog
from ollama_ft.chat_formats import FORMATS, checkpoint_chat_format
from ollama_ft.config import RunConfig, from_mapping
from ollama_ft.errors import BaseModelError, RunDirError
from ollama_ft.quants import DEFAULT_QUANT, quant_names
from ollama_ft.rundir import RUN_FILES, read_json, update_report

ADAPTER_GGUF = "adapter.gguf"  # the LoRA as llama.cpp loads it (export --adapter-only)
OLLAMA_BASE_KEY = "ollama_base"  # train's record of a base taken from an Ollama daemon


def gguf_name(quant: str, base: bool = False) -> str:
    """model-<quant>.gguf (base + LoRA merged), or base-<quant>.gguf (the base alone)."""
    return f"{'base' if base else 'model'}-{quant.strip().lower()}.gguf"


class Run:
    def __init__(self, path: str | Path):
        self.dir = Path(path)
        self._cache: dict[str, tuple[tuple[int, int, int] | None, object]] = {}

    @classmethod
    def open(cls, path: "str | Path | Run") -> "Run":
        """The run at `path` (a Run is passed through); a missing folder is a RunDirError."""
        if isinstance(path, Run):
            return path
        run = cls(path)
        if not run.dir.is_dir():
            raise RunDirError(f"{run.dir}: no such run directory; pass the folder `ollama-ft "
                              "train` wrote (runs/NAME)")
        return run

    def path(self, key: str) -> Path:
        """RUN/<file> by its RUN_FILES key ("config", "report", "adapter", ...)."""
        return self.dir / RUN_FILES[key]

    # --- files, read again only when they change ---------------------------------------------
    def _read(self, key: str, load):
        path = self.path(key)
        try:
            st = path.stat()
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)  # record() renames a new file in
        except OSError:
            stamp = None
        cached = self._cache.get(key)
        if cached is None or cached[0] != stamp:
            cached = (stamp, load(path) if stamp is not None else None)
            self._cache[key] = cached
        return cached[1]

    @property
    def settings(self) -> dict:
        """run.yaml as written (every RunConfig key), {} when the run has none."""
        def load(path: Path) -> dict:
            import yaml

            try:
                data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            except yaml.YAMLError as e:
                raise RunDirError(f"{path}: not valid YAML ({e}); restore it or train again") from None
            if not isinstance(data, dict):
                raise RunDirError(f"{path}: expected a mapping of config keys")
            return data

        return self._read("config", load) or {}

    @property
    def config(self):
        """The typed RunConfig of run.yaml (checked key by key, as --config is), or None."""
        if not self.path("config").is_file():
            return None
        return RunConfig(**from_mapping(self.settings, str(self.path("config"))))

    def setting(self, key: str, default=None):
        value = self.settings.get(key)
        return default if value is None else value

    @property
    def name(self) -> str:
        return str(self.settings.get("name") or self.dir.name)

    @property
    def report(self) -> dict:
        def load(path: Path) -> dict:
            try:
                return read_json(path, {}) or {}
            except ValueError as e:
                raise RunDirError(f"{path}: not valid JSON ({e}); restore it or train again") from None

        return self._read("report", load) or {}

    def section(self, name: str) -> dict:
        value = self.report.get(name)
        return value if isinstance(value, dict) else {}

    @property
    def train(self) -> dict:
        return self.section("train")

    @property
    def export(self) -> dict:
        return self.section("export")

    @property
    def register(self) -> dict:
        return self.section("register")

    @property
    def eval(self) -> dict:
        return self.section("eval")

    @property
    def ollama_base(self) -> dict | None:
        """What train recorded of a base taken from an Ollama daemon, None for other bases."""
        return self.train.get(OLLAMA_BASE_KEY) or None

    @property
    def data_report(self) -> dict | None:
        return self._read("data_report", lambda p: read_json(p))

    def record(self, section: str, values: dict) -> None:
        """Write one section of report.json (the others kept)."""
        update_report(self.dir, section, values)
        self._cache.pop("report", None)

    # --- the base and the chat format ---------------------------------------------------------
    def base_path(self, override: str | Path | None = None) -> Path:
        """The base checkpoint folder (train's, or `override`), checked to hold config.json."""
        recorded = self.train.get("base_path")
        if override is None and not recorded:
            raise RunDirError(f"{self.path('report')}: no train section with base_path; train "
                              "this run first (`ollama-ft train`), or pass the base checkpoint "
                              "folder explicitly")
        path = Path(override if override is not None else recorded)
        if not (path / "config.json").is_file():
            raise RunDirError(f"{path}: the base checkpoint of {self.dir} is not there (no "
                              "config.json); restore it or pass its new folder explicitly")
        return path

    def chat_format_name(self, base_path: str | Path | None = None) -> str:
        """The run's chat format, by one rule: what training used (report.json), else
        run.yaml's chat_format, else what training would pick for the base checkpoint
        (chat_formats.checkpoint_chat_format: its chat template, the catalogue, its special
        tokens). An Ollama base's format is its TEMPLATE (ollama_base.resolve.of_run builds
        it); its name here is "ollama:NAME"."""
        if self.ollama_base:
            return f"ollama:{self.ollama_base.get('name', '?')}"
        name = self.train.get("chat_format") or self.settings.get("chat_format")
        where = base_path or self.train.get("base_path")
        if not name and not where:  # no checkpoint to look at: the catalogue's entry
            entry = self.catalog_entry()
            name = entry.chat_format if entry else None
            if not name:
                raise RunDirError(f"{self.dir}: cannot tell the run's chat format: report.json "
                                  "and run.yaml name none and there is no base checkpoint to "
                                  "look at. Set chat_format in run.yaml, or give an Ollama Go "
                                  "template with --template FILE")
        if not name:
            try:
                name = checkpoint_chat_format(Path(where), self.catalog_entry(),
                                              f"{self.dir}: the base {where}")[0].name
            except BaseModelError as e:  # said for training; here a --template is the way out
                raise RunDirError(f"{e}; or give an Ollama Go template with --template FILE") \
                    from None
        if name not in FORMATS and not name.startswith("ollama:"):
            raise RunDirError(f"{self.path('report')}: train.chat_format {name!r} is not one of "
                              f"{', '.join(FORMATS)}")
        return name

    @property
    def base_spec(self) -> str | None:
        """The --base the run was trained from (a repo id, alias or folder)."""
        return self.train.get("base") or self.settings.get("base")

    @property
    def repo_id(self) -> str | None:
        return self.train.get("repo_id")

    def catalog_entry(self):
        """The catalogue's entry of the run's base (by repo id, else alias), or None."""
        return (catalog.lookup_repo(self.repo_id) if self.repo_id else None) or \
            (catalog.lookup_alias(self.base_spec) if self.base_spec else None)

    def base_context(self) -> int | None:
        """The base's context length: its config.json, else the catalogue's."""
        where = self.train.get("base_path")
        if where:
            try:
                value = json.loads((Path(where) / "config.json").read_text(encoding="utf-8")) \
                    .get("max_position_embeddings")
                if isinstance(value, int) and value > 0:
                    return value
            except (OSError, ValueError, AttributeError):
                pass
        entry = self.catalog_entry()
        return entry.context_length if entry else None

    # --- GGUF files ---------------------------------------------------------------------------
    def gguf(self, quant: str, base: bool = False) -> Path:
        return self.dir / gguf_name(quant, base)

    @property
    def adapter_gguf(self) -> Path:
        return self.dir / ADAPTER_GGUF

    def served_quant(self, base: bool = False) -> str:
        """The quant the run is served as (register, Modelfile and eval take this one):
        run.yaml's; if its GGUF is not there, the first exported one that is."""
        quant = self.settings.get("quant") or DEFAULT_QUANT
        first = quant_names(quant)
        if first and not self.gguf(first[0], base).is_file():
            exported = [k for k in (self.export.get("files") or {}) if k != "adapter"]
            quant = next((k for k in exported if self.gguf(k, base).is_file()), quant)
        return quant

