"""Evaluate a run directory's loops again: ``qpo-ray eval --target live --run-dir RUN [--loops 0,2] [--redo]``.

Evaluates every loop whose policy exists (loop 0 = the offline baselines) and has no ``eval/loop-N.json``
yet (all of them with ``redo``), then rewrites ``report.md`` / ``accuracy.png`` and prints the summary. Pairs
scored earlier in the run are reused, so only new (query, prompt) pairs cost target calls. Step markers are
left alone: this never changes what ``qpo-ray run --resume`` will do.
"""

from __future__ import annotations

import logging
from pathlib import Path

from qpo_ray.config import RunConfig
from qpo_ray.driver import steps
from qpo_ray.driver.run import check_run_dir, load_run_config, print_summary, report
from qpo_ray.driver.session import Session
from qpo_ray.errors import QPOError
from qpo_ray.locks import writer_lock
from qpo_ray.ray_init import init_ray
from qpo_ray.runs import RunDir

log = logging.getLogger("qpo_ray")


def _loops(rd: RunDir, cfg: RunConfig, wanted: str | None) -> list[int]:
    trained = [0] + [t for t in range(1, cfg.loops + 1) if (rd.policy_dir(t) / "policy_config.json").is_file()]
    if wanted is None:
        return trained
    try:
        asked = [int(x) for x in wanted.split(",") if x.strip()]
    except ValueError:
        raise QPOError(f"--loops {wanted}: expected comma-separated integers") from None
    missing = [t for t in asked if t not in trained]
    if missing:
        raise QPOError(f"--loops: no trained policy for loop(s) {missing} in {rd.path} (have {trained})")
    return asked


def evaluate_run(run_dir: str | Path, *, loops: str | None = None, redo: bool = False,
                 overrides: list[str] | None = None) -> Path:
    """Evaluate the run's missing (or all, with ``redo``) loops; returns the report's path."""
    rd = RunDir(run_dir)
    check_run_dir(rd, "--run-dir")
    with writer_lock(rd.path):  # it writes the run's eval/, scores/ and report: one writer at a time
        cfg = load_run_config(rd, overrides, what="--run-dir")
        if rd.done("bootstrap") is None:
            raise QPOError(f"{rd.path}: the run has no dataset yet (bootstrap not done); run or resume it first")
        todo = [t for t in _loops(rd, cfg, loops) if redo or not (rd.path / "eval" / f"loop-{t}.json").is_file()]
        if todo:
            init_ray()  # only scoring needs Ray; a report from existing results does not
        s = Session(cfg, rd)
        try:
            if todo:
                s.pool.start()
            for t in todo:
                log.info("[evaluate] loop %d", t)
                steps.evaluate(cfg, s.task, rd, s.store, s.scores, s.tracker, t)
            path = report(s)
        finally:
            s.close()
    print_summary(rd, path, calls_here=s.calls)
    return path
