"""The run directory: where every step of a run persists its output and marks itself done.

A step's output is written atomically (``qpo_ray.atomic``: temp file, fsync, rename), then
``steps/<name>.json`` records that it finished and what it produced. ``qpo-ray run --resume`` skips steps that
have a marker; a step without one is redone from scratch, so a crash can only cost the unfinished step.

A run directory can be moved or copied between steps: nothing in it depends on its absolute path. The config's
``run_dir`` is re-derived from where the run is opened, checkpoints live under it (``train.storage_path`` is
relative to it), and ``run_id`` (which names the Ray Train runs) is stored in the directory, not derived from
its path each time.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Any

from qpo_ray.atomic import atomic_write_bytes, atomic_write_json
from qpo_ray.ids import content_id

RUN_ID_FILE = "run_id"


def run_dir_of(path: str | Path) -> Path | None:
    """The run directory ``path`` lies in (or is): the nearest folder at or above it that holds a run
    (``config.yaml`` and ``steps/``) or dataset versions (``data/vNNN``); None when there is none."""
    p = Path(path).resolve()
    for folder in (p, *p.parents):
        if ((folder / "config.yaml").is_file() and (folder / "steps").is_dir()) \
                or any((folder / "data").glob("v[0-9]*/manifest.json")):
            return folder
    return None


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

    @cached_property
    def run_id(self) -> str:
        """The run's short id, fixed when first asked for and kept in ``RUN_DIR/run_id``: a moved run keeps
        its Ray Train run names, so training resumes from its checkpoints instead of starting again."""
        p = self.path / RUN_ID_FILE
        if p.is_file():
            return p.read_text(encoding="utf-8").strip()
        # What it was before it was stored (a hash of the path), so runs started earlier keep their names.
        value = content_id(str(self.path), n=8)
        atomic_write_bytes(p, value.encode("utf-8"))
        return value

    def done(self, step: str) -> dict[str, Any] | None:
        p = self.steps / f"{step}.json"
        if not p.is_file():
            return None
        return json.loads(p.read_text(encoding="utf-8"))

    def mark(self, step: str, info: dict[str, Any] | None = None) -> None:
        atomic_write_json(self.steps / f"{step}.json", info or {})
