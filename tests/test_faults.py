"""Reliability drill: kill the driver at every kind of step boundary; the dataset must come out as an
uninterrupted run's, the pairs sent to the target must be exactly that run's, each sent once, and what was
scored before a kill must survive it.

One loop holds every kind of step (a later loop only repeats them): the drill runs the reference run's config
and seed with ``loops=1`` and compares with the reference run's first versions and the pairs it scored up to
the end of loop 1 (a loop's steps never depend on how many loops follow)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from qpo_ray.data.store import DatasetStore
from tests.e2e import REPO, dataset_rows, qpo, same_rows, scored_keys

LOOPS = 1
STEPS = ("bootstrap", "eval-0", "loop-1", "eval-1")  # the steps that score, up to the end of loop 1

pytestmark = pytest.mark.slow

# (what is interrupted, the fault point), one of each kind. None = killed from outside while Ray Train is
# training. A step is killed before its marker (its work is redone, reusing what it persisted) and just after it
# (it is skipped); a step killed before it writes anything is the latter case (the merge re-entered with its
# version committed is test_relocate.py's). Every step scores through the same chunked, persisted path
# (RunScores.score; rows come back in input order and get the asking step's label), so scoring is killed once.
DRILL = [
    ("scoring (bootstrap, after its first persisted chunk)", "score.bootstrap.chunk"),
    ("a dataset version half-written (v000, before its rename)", "store.commit.before-rename"),
    ("training (loop 1, driver killed mid-fit)", None),
    ("sampling and screening (loop 1 collect, just after its marker)", "loop-1.collect.done"),
    ("evaluation (loop 1, its work done, before its marker)", "loop-1.eval.before-mark"),
]


def _kill_during_training(run_dir: Path, timeout: float = 900) -> int:
    """Start a resume and SIGKILL the driver once loop 1's first training checkpoint exists."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "QPO_RAY_FAULT")}
    p = subprocess.Popen([sys.executable, "-m", "qpo_ray", "run", "--resume", str(run_dir)], cwd=REPO, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and p.poll() is None:
            if list((run_dir / "train").glob("*-loop-1/epoch-0001*")):
                p.send_signal(signal.SIGKILL)
                break
            time.sleep(0.2)
        return p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()


def test_driver_killed_anywhere_loses_and_duplicates_nothing(reference_run, tmp_path):
    run_dir = tmp_path / "run"
    first = True
    scored_before: set[str] = set()
    for what, fault in DRILL:
        args = (("run", "--config", "tiny", "--set", f"run_dir={run_dir}", "--set", f"loops={LOOPS}") if first
                else ("run", "--resume", str(run_dir)))
        rc = _kill_during_training(run_dir) if fault is None else qpo(*args, fault=fault, check=False).returncode
        first = False
        assert rc == -9, f"expected the driver to be killed during {what}, it exited {rc}"
        store = DatasetStore(run_dir)
        for v in store.versions():  # whatever is visible is complete and verifies
            store.verify(v)
        keys = scored_keys(run_dir)
        assert len(keys) == len(set(keys)), f"a pair was sent to the target twice (after killing {what})"
        assert scored_before <= set(keys), f"scores persisted before were lost (after killing {what})"
        scored_before = set(keys)
    qpo("run", "--resume", str(run_dir))
    store = DatasetStore(run_dir)
    assert store.versions() == list(range(LOOPS + 1))
    for v in store.versions():
        store.verify(v)
        assert same_rows(dataset_rows(run_dir, v), dataset_rows(reference_run, v))
    assert not list((run_dir / "data").glob(".tmp-*"))
    after = scored_keys(run_dir)
    assert max(Counter(after).values()) == 1
    # The scores persisted before each kill survive every resume, and with what the resumes scored they are
    # exactly the pairs an uninterrupted run sends to the target.
    assert scored_before <= set(after)
    assert set(after) == set(scored_keys(reference_run, steps=STEPS))
    assert (run_dir / "report.md").is_file()
