"""Helpers for end-to-end tests: run the real CLI in a subprocess (so a SIGKILL hits only the driver)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

from qpo_ray.data.store import DatasetStore

REPO = Path(__file__).resolve().parents[1]


def qpo(*args: str, fault: str | None = None, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONUNBUFFERED"] = "1"
    if fault:
        env["QPO_RAY_FAULT"] = fault
    else:
        env.pop("QPO_RAY_FAULT", None)
    p = subprocess.run([sys.executable, "-m", "qpo_ray", *args], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"qpo-ray {' '.join(args)} exited {p.returncode}\n--- stdout\n{p.stdout[-4000:]}"
                             f"\n--- stderr\n{p.stderr[-8000:]}")
    return p


def dataset_rows(run_dir: Path, version: int | None = None) -> list[tuple]:
    """(key, reward, source) of every row of a version, sorted by key: the identity of a dataset."""
    store = DatasetStore(run_dir)
    v = store.latest() if version is None else version
    t = store.read_table(v, columns=["key", "reward", "source"])
    return sorted(zip(t.column("key").to_pylist(), t.column("reward").to_pylist(), t.column("source").to_pylist(),
                      strict=True))


def same_rows(a: list[tuple], b: list[tuple], tol: float = 1e-4) -> bool:
    """Same keys and sources in the same order, rewards equal within ``tol``.

    The target scores requests in whatever batches Serve forms; a different padding changes float32 sums
    in the last bits (seen: 1e-6), never which pairs exist or their outcome.
    """
    return len(a) == len(b) and all(x[0] == y[0] and x[2] == y[2] and abs(x[1] - y[1]) <= tol
                                    for x, y in zip(a, b, strict=True))


def scored_keys(run_dir: Path) -> list[str]:
    """Every pair key sent to the target in a run (the persisted score chunks), with repeats."""
    keys: list[str] = []
    for f in sorted((run_dir / "scores").glob("*.parquet")):
        keys += pq.read_table(f, columns=["key"]).column("key").to_pylist()
    return keys
