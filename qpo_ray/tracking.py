"""Experiment tracking: metrics.jsonl (the source of truth), TensorBoard events, and MLflow when configured.

Every record carries ``loop`` and a ``global_step`` that keeps increasing across loops, so curves from
different loops line up on one axis.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

from qpo_ray.jsonl import read_jsonl

log = logging.getLogger(__name__)


class Tracker:
    """Append-only metrics sink for one run directory."""

    def __init__(self, run_dir: str | Path, tracking: dict[str, Any] | None = None, config: dict | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = self.run_dir / "metrics.jsonl"
        self._tb = None
        self._mlflow = None
        try:
            from tensorboardX import SummaryWriter

            # Event files are named by second and host: a unique suffix keeps a resumed driver that starts
            # within the same second from overwriting the previous one's file.
            self._tb = SummaryWriter(str(self.run_dir / "tb"), filename_suffix=f".{os.getpid()}.{uuid.uuid4().hex[:8]}")
        except ImportError:  # tensorboardX ships with ray[train]; keep tracking usable without it
            log.warning("tensorboardX not installed: TensorBoard events are not written")
        tracking = tracking or {}
        if tracking.get("mlflow_uri"):
            self._start_mlflow(tracking, config)

    def _start_mlflow(self, tracking: dict[str, Any], config: dict | None) -> None:
        try:
            import mlflow
        except ImportError:
            log.warning("tracking.mlflow_uri is set but mlflow is not installed (pip install 'qpo-ray[mlflow]')")
            return
        mlflow.set_tracking_uri(tracking["mlflow_uri"])
        mlflow.set_experiment(tracking.get("experiment", "qpo_ray"))
        mlflow.start_run(run_name=tracking.get("run_name", self.run_dir.name))
        if config:
            flat = _flatten(config)
            mlflow.log_params({k: str(v)[:250] for k, v in flat.items()})
        self._mlflow = mlflow

    def log(self, event: str, metrics: dict[str, Any], *, loop: int, global_step: int) -> None:
        """Record one set of metrics. Numbers go to TensorBoard/MLflow as ``event/name``."""
        rec = {"event": event, "loop": loop, "global_step": global_step, "time": time.time(), **metrics}
        with open(self.jsonl, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec, default=str) + "\n")
        numbers = {f"{event}/{k}": float(v) for k, v in metrics.items()
                   if isinstance(v, int | float) and not isinstance(v, bool)}
        if self._tb is not None:
            for tag, v in numbers.items():
                self._tb.add_scalar(tag, v, global_step)
            self._tb.flush()
        if self._mlflow is not None:
            self._mlflow.log_metrics({k.replace("/", ".") : v for k, v in numbers.items()}, step=global_step)

    def artifact(self, path: str | Path) -> None:
        if self._mlflow is not None:
            self._mlflow.log_artifact(str(path))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._mlflow is not None:
            self._mlflow.end_run()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    p = Path(run_dir) / "metrics.jsonl"
    if not p.is_file():
        return []
    return [rec for _, rec in read_jsonl(p)]


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
