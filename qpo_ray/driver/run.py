"""The QPO loop (docs/design.md §1) as persisted steps: ``qpo-ray run`` and ``qpo-ray run --resume RUN_DIR``."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tqdm import tqdm

from qpo_ray.atomic import atomic_write_json
from qpo_ray.config import RunConfig, dump_config, load_config
from qpo_ray.driver import steps
from qpo_ray.driver.session import Session, StepTimer
from qpo_ray.driver.storage import check_shared_storage
from qpo_ray.driver.watch import FIXED_FAIL_S, watch
from qpo_ray.errors import ConfigError, QPOError
from qpo_ray.evaluate.report import loop_over_loop, summary_table, write_report
from qpo_ray.faults import fault_point
from qpo_ray.locks import writer_lock
from qpo_ray.pretrained import check_model_spec
from qpo_ray.ray_init import init_ray, link_ray_logs
from qpo_ray.resources import autoscaler_adds_nodes, ensure_cluster, plan_pool, run_phases
from qpo_ray.runs import RunDir
from qpo_ray.score.engines import target_precision
from qpo_ray.stopping import Stopped, check_stop, stop_on_signals
from qpo_ray.stopping import install as install_stop_handlers
from qpo_ray.tasks import load_task

log = logging.getLogger("qpo_ray")


def run_qpo(cfg: RunConfig | None = None, *, resume: str | Path | None = None,
            overrides: list[str] | None = None) -> Path:
    """Run (or resume) a QPO run; returns the report's path. ``overrides`` apply to a resumed run's saved
    config (``resume_config``: only ``loops`` may change). Holds the run directory's writer lock throughout;
    SIGINT/SIGTERM raise :class:`Stopped` carrying the run directory."""
    t0 = time.time()
    where = Path(resume if resume is not None else (cfg or load_config("tiny")).run_dir).resolve()
    try:
        with stop_on_signals(), open_run(cfg, resume, overrides) as (cfg, rd):
            path, calls = _run_steps(cfg, rd)
    except Stopped as e:
        if (where / "config.yaml").is_file():  # stopped once the run existed: it can be resumed
            e.run_dir = where
        raise
    print_summary(rd, path, started=t0, calls_here=calls)
    return path


def _run_steps(cfg: RunConfig, rd: RunDir) -> tuple[Path, int]:
    """Every step not done yet, then the report; returns the report's path and this invocation's target calls."""
    with _logging_to(rd.path / "logs" / "driver.log"):
        init_ray()
        link_ray_logs(rd.path)
        hold = plan_pool(cfg)
        check_shared_storage(cfg)
        can_grow = autoscaler_adds_nodes()
        needs = [n for phase in run_phases(cfg) for n in phase]
        s = Session(cfg, rd)
        store, task, scores, tracker = s.store, s.task, s.scores, s.tracker
        try:
            def step(name: str, fn: Callable[[], dict[str, Any]], *, target: bool = False) -> None:
                check_stop()
                install_stop_handlers()  # in case a library of the last step replaced them
                if rd.done(name) is not None:
                    log.info("[%s] done earlier: skipped", name)
                    return
                if target:  # the step scores pairs: deploy the pool unless it runs already
                    s.pool.start()
                    check_stop()  # a signal while Serve deployed the pool stops the run here at the latest
                elif not hold and name.endswith((".train", ".collect")):
                    s.pool.close()  # its CPUs/GPUs go to the Train workers or the sampling actors
                log.info("[%s] start", name)
                with StepTimer(s.pool) as t, watch(name, needs, can_grow=can_grow,
                                                   fail_s=cfg.resource_wait_s if can_grow else FIXED_FAIL_S):
                    info = fn()
                fault_point(f"{name}.before-mark")
                # A step whose signal a library swallowed may have returned early: it gets no marker.
                check_stop()
                rd.mark(name, {**info, **t.info, "step": name, "finished": time.time()})
                fault_point(f"{name}.done")
                log.info("[%s] done in %.1f s (%d target calls)", name, t.info["wall_s"], t.info["target_calls"])

            step("bootstrap", lambda: steps.bootstrap(cfg, task, store, scores), target=True)
            step("eval-0", lambda: steps.evaluate(cfg, task, rd, store, scores, tracker, 0), target=True)
            for t in range(1, cfg.loops + 1):
                step(f"loop-{t}.train", lambda t=t: steps.train(cfg, rd, store, tracker, t))
                step(f"loop-{t}.collect", lambda t=t: steps.collect(cfg, task, rd, scores, t))
                step(f"loop-{t}.score", lambda t=t: steps.score(cfg, rd, store, scores, t), target=True)
                step(f"loop-{t}.merge", lambda t=t: steps.merge(cfg, task, rd, store, t))
                step(f"loop-{t}.eval", lambda t=t: steps.evaluate(cfg, task, rd, store, scores, tracker, t),
                     target=True)
            check_stop()
            path = report(s)
        finally:
            s.close()  # deletes the pool's Serve app (its replicas) before the summary is printed
    return path, s.calls


@contextmanager
def _logging_to(path: Path) -> Iterator[None]:
    """Inside the block, what the driver logs (INFO, or DEBUG with -v) is appended to ``path`` too."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    try:
        yield
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def check_run_dir(rd: RunDir, what: str = "--resume") -> None:
    """A QPOError unless ``rd`` holds a run (its config.yaml): checked before its writer lock is taken, so a
    mistyped path gets no lock file."""
    if not (rd.path / "config.yaml").is_file():
        raise QPOError(f"{what} {rd.path}: no config.yaml there — not a qpo-ray run directory")


def load_run_config(rd: RunDir, overrides: list[str] | None = None, *, what: str = "--resume") -> RunConfig:
    """The run's saved config, with ``run_dir`` where the run is now: a moved or copied run works on itself,
    never on its old location. The saved file is updated when the run has moved."""
    check_run_dir(rd, what)
    saved = rd.path / "config.yaml"
    cfg = load_config(saved, overrides)
    if Path(cfg.run_dir) != rd.path:
        log.info("run directory %s was created as %s: it works on %s", rd.path, cfg.run_dir, rd.path)
        cfg = cfg.model_copy(update={"run_dir": str(rd.path)})
        if not overrides:
            dump_config(cfg, saved)
    return cfg


def _leaves(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_leaves(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resume_config(rd: RunDir, overrides: list[str] | None = None) -> RunConfig:
    """The config a resumed run goes on with: its saved one, with ``loops`` raised when ``--set loops=N``
    asks for more (the saved config.yaml is updated). Any other changed setting is refused: the finished
    steps were made with the saved one, and a run mixing two would be neither."""
    cfg = load_run_config(rd)
    if not overrides:
        return cfg
    saved = rd.path / "config.yaml"
    asked = load_config(saved, overrides)
    # What the overrides change in the saved file (its run_dir may be where a moved run was created).
    old, new = _leaves(load_config(saved).model_dump(mode="json")), _leaves(asked.model_dump(mode="json"))
    changed = sorted(k for k in old.keys() | new.keys()
                     if old.get(k) != new.get(k) and not (k == "run_dir" and Path(new[k]).resolve() == rd.path))
    refused = [k for k in changed if k != "loops"]
    if refused:
        raise ConfigError(f"--resume {rd.path}: --set {', '.join(refused)} cannot change a run that has started "
                          f"(its finished steps used {saved}); only loops can be raised on --resume. Start a new "
                          "run (another run_dir) for other settings")
    if asked.loops < cfg.loops:
        raise ConfigError(f"--resume {rd.path}: --set loops={asked.loops} is fewer than the run's {cfg.loops} loops; "
                          "loops can only be raised on --resume")
    if asked.loops > cfg.loops:
        log.info("extending %s from %d to %d loops", rd.path, cfg.loops, asked.loops)
        cfg = cfg.model_copy(update={"loops": asked.loops})
        dump_config(cfg, saved)
    return cfg


@contextmanager
def open_run(cfg: RunConfig | None, resume: str | Path | None,
             overrides: list[str] | None = None) -> Iterator[tuple[RunConfig, RunDir]]:
    """The run's config and directory, its writer lock held inside the block: ``resume``'s saved run (with
    ``overrides``: ``resume_config``), else a new one for ``cfg`` (checked, its config.yaml written). Fails
    before any work when the cluster cannot host the run, or when another process writes the directory."""
    if resume is not None:
        rd = RunDir(resume)
        check_run_dir(rd)
        with writer_lock(rd.path):
            cfg = resume_config(rd, overrides)  # may rewrite config.yaml: under the lock
            ensure_cluster(cfg, run_phases(cfg))
            log.info("resuming %s", rd.path)
            yield cfg, rd
        return
    if cfg is None:
        cfg = load_config("tiny")
    _preflight(cfg)
    rd = RunDir(cfg.run_dir)
    _check_new(rd)
    cfg = cfg.model_copy(update={"run_dir": str(rd.path)})
    # Before the run directory exists: a run the cluster cannot host leaves nothing to clean up.
    ensure_cluster(cfg, run_phases(cfg))
    with writer_lock(rd.path):
        _check_new(rd)  # again under the lock: two runs started at once into one run_dir
        dump_config(cfg, rd.path / "config.yaml")
        _ = rd.run_id  # fixed now, while the run is where it was created
        yield cfg, rd


def _check_new(rd: RunDir) -> None:
    if (rd.path / "config.yaml").exists():
        raise QPOError(f"run directory {rd.path} already holds a run: use --resume {rd.path} or another run_dir")


def _preflight(cfg: RunConfig) -> None:
    """Errors that would otherwise surface only after minutes of work (the cluster's size: ``ensure_cluster``)."""
    load_task(cfg.task.name)  # a missing or malformed task file, before Ray starts
    check_model_spec(cfg.policy.model, "policy.model")
    if cfg.eval.rerank_margin == "fit":
        raise ConfigError("eval.rerank_margin='fit' is fitted on recorded logs held out of training, which only "
                          "`qpo-ray eval --target replay` has; a live run needs a number (0 = plain rerank)")
    if cfg.target.engine in ("transformers", "vllm"):
        check_model_spec(cfg.target.model, "target.model")


def _results(rd: RunDir) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The run's evaluations (by loop) and step markers (in the order they finished)."""
    evals = [json.loads(p.read_text()) for p in sorted((rd.path / "eval").glob("loop-*.json"),
                                                         key=lambda p: int(p.stem.split("-")[1]))]
    markers = sorted(rd.steps.glob("*.json"), key=lambda p: json.loads(p.read_text()).get("finished", 0))
    return evals, [json.loads(p.read_text()) for p in markers]


def report(s: Session) -> Path:
    """Write report.md (+ its PNG); returns its path."""
    evals, step_infos = _results(s.run)
    header = {"task": s.task.name, "setting": s.cfg.task.setting, "target": s.target,
              "target engine": s.cfg.target.engine, "target precision": target_precision(s.cfg.target),
              "policy": s.cfg.policy.model, "loops": s.cfg.loops, "dataset versions": len(s.store.versions()),
              "rows in latest version": s.store.manifest(s.store.latest()).rows}
    generated = {t: json.loads(f.read_text()) for t in range(1, s.cfg.loops + 1)
                 if (f := s.run.loop_dir(t) / "generated.json").is_file()}
    lol = loop_over_loop(evals, seed=s.cfg.seed)
    atomic_write_json(s.run.path / "eval" / "summary.json", {"loop_over_loop": lol, "generated": generated})
    path = write_report(s.run.path, evals, step_infos, header, generated, lol)
    s.tracker.artifact(path)
    return path


def print_summary(rd: RunDir, path: Path, *, started: float | None = None, calls_here: int | None = None) -> None:
    """The end of a run on the console: the table, the report, the wall time, the target calls, the logs."""
    evals, step_infos = _results(rd)
    steps_wall = sum(i.get("wall_s", 0.0) for i in step_infos)
    calls = sum(i.get("target_calls", 0) for i in step_infos)
    wall = f"{tqdm.format_interval(time.time() - started)} this invocation, " if started is not None else ""
    here = f" ({calls_here:,} by this invocation)" if calls_here is not None else ""
    print("\n" + summary_table(evals) + "\n", flush=True)
    for info in step_infos:
        gen = info.get("generated")
        if gen and gen.get("scored"):
            print(f"{info['step']}: {gen['new']} of {gen['scored']} scored collect prompts new "
                  f"({100 * gen['new_share']:.0f}%), {gen['beats_pool']} beat every pool prompt on their queries",
                  flush=True)
    print(f"report:       {path}\n"
          f"wall time:    {wall}{tqdm.format_interval(steps_wall)} in the run's steps\n"
          f"target calls: {calls:,}{here}\n"
          f"logs:         {rd.path / 'logs'}", flush=True)
