"""The run directory: where every step of a run persists its output and marks itself done.

A step's output is written atomically (temp file + rename), then ``steps/<name>.json`` records that it
finished and what it produced. ``qpo-ray run --resume`` skips steps that have a marker; a step without
one is redone from scratch, so a crash can only cost the unfinished step.
"""

from __future__ import annotations

import json
import os
import signal
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

FAULT_ENV = "QPO_RAY_FAULT"


def fault_point(name: str) -> None:
    """Named crash point for fault-injection tests: SIGKILL this process when ``$QPO_RAY_FAULT == name``.

    Nothing else in the code knows about faults; the kill is as abrupt as a node loss.
    """
    if os.environ.get(FAULT_ENV) == name:
        print(f"[qpo-ray] fault injection: SIGKILL at '{name}'", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1, sort_keys=True, default=str).encode("utf-8"))


def atomic_write_table(path: Path, table: pa.Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    pq.write_table(table, tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RunDir:
    """Paths and step markers of one run directory."""

    def __init__(self, path: str | Path):
        self.path = Path(path).resolve()

    @property
    def steps(self) -> Path:
        return self.path / "steps"

    @property
    def scores(self) -> Path:
        return self.path / "scores"

    def loop_dir(self, loop: int) -> Path:
        return self.path / "loops" / f"loop-{loop}"

    def policy_dir(self, loop: int) -> Path:
        return self.path / "policy" / f"loop-{loop}"

    def done(self, step: str) -> dict[str, Any] | None:
        p = self.steps / f"{step}.json"
        if not p.is_file():
            return None
        return json.loads(p.read_text(encoding="utf-8"))

    def mark(self, step: str, info: dict[str, Any] | None = None) -> None:
        atomic_write_json(self.steps / f"{step}.json", info or {})
