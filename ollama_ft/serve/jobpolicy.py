"""What a training-job request may ask of the service, and uploaded data files.

A job request comes over HTTP, so it names nothing on this machine by itself:
- data and eval_data are files uploaded to the service (`POST /api/ft/uploads`, digest
  checked, size limited; the job says `upload:<sha256 hex>`), or paths inside the folders
  the service was started with (`ollama-ft serve --data-dir DIR`);
- a local base checkpoint must lie inside those folders too (aliases and Hub ids are fine);
- outputs stay under the service's home (`output_dir`, if given, is a name under
  HOME/runs);
- `trust_remote_code` and `allow_pickle` run foreign code, so they are refused unless the
  service was started with `--allow-remote-code`.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ollama_ft.errors import ConfigError

UPLOAD_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
MAX_UPLOAD = int(os.environ.get("OLLAMA_FT_MAX_UPLOAD", str(2 * 2**30)))
_UPLOAD_REF = re.compile(r"^upload:([0-9a-f]{64})$")


@dataclass
class JobPolicy:
    home: Path
    read_dirs: list[Path] = field(default_factory=list)
    allow_remote_code: bool = False

    @property
    def uploads(self) -> Path:
        return Path(self.home) / "uploads"

    def _inside_read_dirs(self, path: Path) -> bool:
        real = Path(os.path.realpath(path))
        return any(real == d or d in real.parents
                   for d in (Path(os.path.realpath(x)) for x in self.read_dirs))

    def _data(self, value, key: str) -> str | None:
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise ConfigError(f"job: '{key}' must be an upload reference (upload:<sha256>) or "
                              "a path inside a --data-dir folder")
        m = _UPLOAD_REF.match(value)
        if m:
            found = [p for p in self.uploads.glob(m.group(1) + ".*") if p.suffix in UPLOAD_SUFFIXES]
            if not found:
                raise ConfigError(f"job: '{key}': no uploaded file {value}; upload it first "
                                  "(POST /api/ft/uploads)")
            return str(found[0])
        if self.read_dirs and self._inside_read_dirs(Path(value)):
            return value
        raise ConfigError(f"job: '{key}' {value!r} is not an uploaded file; upload the data "
                          "(POST /api/ft/uploads) and pass upload:<sha256>, or start the "
                          "service with --data-dir FOLDER to let jobs read files there")

    def check(self, values: dict, job_id: str) -> dict:
        """The job's config values with data resolved and outputs placed; ConfigError else."""
        values = dict(values)
        for key in ("trust_remote_code", "allow_pickle"):
            if values.get(key) and not self.allow_remote_code:
                raise ConfigError(f"job: '{key}' runs code from the model's files; this service "
                                  "was started without --allow-remote-code, so it refuses it")
        values["data"] = self._data(values.get("data"), "data")
        if values.get("eval_data") is not None:
            values["eval_data"] = self._data(values["eval_data"], "eval_data")
        base = values.get("base")
        if isinstance(base, str) and _looks_like_path(base) and not (
                self.read_dirs and self._inside_read_dirs(Path(base))):
            raise ConfigError(f"job: base {base!r} is a local folder outside the service's "
                              "--data-dir folders; use a catalogue alias or Hub id, or start "
                              "the service with --data-dir covering it")
        runs = Path(self.home) / "runs"
        out = values.get("output_dir")
        if out:
            rel = Path(out)
            if rel.is_absolute() or ".." in rel.parts or not rel.parts:
                raise ConfigError(f"job: output_dir {out!r} must be a plain name; job outputs "
                                  f"stay under {runs}")
            values["output_dir"] = str(runs / rel)
        else:
            values["output_dir"] = str(runs / f"{values.get('name') or 'run'}-{job_id}")
        return values

    async def save_upload(self, chunks, filename: str, digest: str | None) -> dict:
        """Store an uploaded data file (async chunks) as uploads/<sha256><suffix>."""
        suffix = Path(filename or "").suffix.lower()
        if suffix not in UPLOAD_SUFFIXES:
            raise ConfigError(f"upload: filename {filename!r} must end in one of "
                              f"{', '.join(UPLOAD_SUFFIXES)}")
        if digest is not None and not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
            raise ConfigError("upload: digest must be sha256:<64 lowercase hex>")
        self.uploads.mkdir(parents=True, exist_ok=True)
        from ollama_ft.serve.http import feed

        tmp = self.uploads / f".upload-{os.getpid()}-{id(chunks)}"
        h, size = hashlib.sha256(), 0
        try:
            with open(tmp, "wb") as f:
                def write(chunk):  # in a worker thread (feed): the event loop stays free
                    nonlocal size
                    size += len(chunk)
                    if size > MAX_UPLOAD:
                        raise UploadTooLarge(f"upload larger than {MAX_UPLOAD} bytes")
                    h.update(chunk)
                    f.write(chunk)
                await feed(chunks, write)
            got = "sha256:" + h.hexdigest()
            if digest is not None and got != digest:
                raise ConfigError(f"upload: digest mismatch (received {got})")
            final = self.uploads / (h.hexdigest() + suffix)
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        return {"data": f"upload:{h.hexdigest()}", "digest": got, "size": size,
                "filename": Path(filename).name}


class UploadTooLarge(ConfigError):
    pass


def _looks_like_path(base: str) -> bool:
    return base.startswith(("/", ".", "~")) or Path(base).exists()
