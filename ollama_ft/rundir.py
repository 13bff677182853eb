"""The run directory: where every stage reads and writes, and how files appear whole."""

from __future__ import annotations

import json
import os
from pathlib import Path

RUN_FILES = {
    "config": "run.yaml",
    "data_report": "data-report.json",
    "checkpoints": "checkpoints",
    "adapter": "adapter",
    "metrics": "metrics.jsonl",
    "loss_plot": "loss.png",
    "report": "report.json",
    "modelfile": "Modelfile",
}


def temp_path(path: Path) -> Path:
    """Where `path` is written before it is renamed: `.NAME.tmp-PID` beside it (a dead writer's
    files are found by that pattern and removed)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary name beside `path`, then rename: `path` is always whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def read_json(path: Path, default=None):
    path = Path(path)
    if not path.is_file():
        return default
    return json.loads(path.read_text(encoding="utf-8"))


def update_report(run_dir: Path, section: str, values: dict) -> None:
    """Merge one stage's figures into RUN/report.json."""
    path = Path(run_dir) / RUN_FILES["report"]
    report = read_json(path, {})
    report[section] = values
    write_json(path, report)
