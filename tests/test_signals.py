"""A real `qpo-ray run --resume` stopped by SIGINT and by SIGTERM mid-step, and a second run refused while the
first holds the run: each stop says how to resume and exits 128 + the signal, with no traceback and no native
stack dump, and the next resume finishes with no pair scored twice.

One copy of the shared reference run is resumed three times. Loop 2's training and evaluation are marked
undone and every evaluation score is removed: the first resume calls Ray Train's ``fit`` again (it finds the
final checkpoint and trains nothing, but sets a SIGINT handler of its own, as a fresh run's training does), and
each resume then starts the scoring pool to score the pool's test pairs again. Both signals arrive while the
pool starts."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.e2e import REPO, qpo, scored_keys

pytestmark = pytest.mark.slow

STEP = "loop-2.eval"
POOL_STARTS = "' starting ("  # "scoring pool 'NAME' starting (engine, model)": the step's pool deploys now


def _start(run_dir: Path, out: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "QPO_RAY_FAULT")}
    env["PYTHONUNBUFFERED"] = "1"
    with open(out, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "qpo_ray", "run", "--resume", str(run_dir)], cwd=REPO,
                                env=env, stdout=f, stderr=subprocess.STDOUT)


def _wait_for(p: subprocess.Popen, log: Path, offset: int, text: str, timeout: float = 600) -> None:
    """Until ``text`` is in the driver's log after ``offset`` (what this invocation wrote)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert p.poll() is None, f"the run exited ({p.returncode}) before logging {text!r}"
        if log.is_file() and text in log.read_text(encoding="utf-8", errors="replace")[offset:]:
            return
        time.sleep(0.2)
    raise TimeoutError(f"no {text!r} in {log} after {timeout} s")


def _stop(run_dir: Path, tmp_path: Path, sig: signal.Signals, holder_check=None) -> str:
    """Resume, send ``sig`` once the step has started, return the console; asserts how it ended."""
    log = run_dir / "logs" / "driver.log"
    offset = len(log.read_text(encoding="utf-8", errors="replace")) if log.is_file() else 0
    out = tmp_path / f"{sig.name}.txt"
    p = _start(run_dir, out)
    try:
        _wait_for(p, log, offset, POOL_STARTS)
        if holder_check is not None:
            holder_check(p)
        p.send_signal(sig)
        rc = p.wait(timeout=300)
    finally:
        if p.poll() is None:
            p.kill()
    console = out.read_text(encoding="utf-8", errors="replace")
    assert rc == 128 + sig, f"{sig.name}: exit {rc}\n{console[-4000:]}"
    assert f"qpo-ray: stopped by {sig.name}; resume with: qpo-ray run --resume {run_dir}" in console
    assert "Traceback" not in console and "*** SIG" not in console, console[-4000:]
    assert not (run_dir / "steps" / f"{STEP}.json").exists()  # the stopped step is not trusted
    assert not list((run_dir / "data").glob(".tmp-*"))
    return console


def test_signals_stop_a_run_that_then_resumes(reference_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference_run, run_dir, symlinks=True)
    for step in ("loop-2.train", STEP):
        (run_dir / "steps" / f"{step}.json").unlink()
    for f in (run_dir / "scores").glob("eval-*.parquet"):
        f.unlink()

    def second_is_refused(first: subprocess.Popen) -> None:
        t0 = time.time()
        p = qpo("run", "--resume", str(run_dir), check=False, timeout=120)
        assert p.returncode == 2, p.stderr[-3000:]
        assert f"is being written by PID {first.pid} " in p.stderr and "Traceback" not in p.stderr
        assert time.time() - t0 < 60  # refused before Ray starts

    _stop(run_dir, tmp_path, signal.SIGINT, holder_check=second_is_refused)
    _stop(run_dir, tmp_path, signal.SIGTERM)
    qpo("run", "--resume", str(run_dir))
    assert (run_dir / "steps" / f"{STEP}.json").is_file() and (run_dir / "report.md").is_file()
    assert max(Counter(scored_keys(run_dir)).values()) == 1, "a pair was sent to the target twice"
