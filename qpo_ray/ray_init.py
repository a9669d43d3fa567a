"""Starting (or joining) Ray the same way in every command, quietly.

Quiet by default: workers' output (Serve's access log, Ray Train's controller, model-loading bars) and
Ray's own INFO lines stay in Ray's log files, which ``link_ray_logs`` links into the run directory. The
console keeps the project's progress, its log and every warning. ``qpo-ray -v`` shows everything."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from qpo_ray.stopping import install as install_stop_handlers

log = logging.getLogger("qpo_ray")

# Driver-side loggers of Ray's libraries that print INFO lines of their own on every call.
RAY_LOGGERS = ("ray", "ray.data", "ray.serve", "ray.train", "ray.tune")


def _warnings_and_above(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING


def verbose() -> bool:
    """``qpo-ray -v`` (debug logging) also shows Ray's own output."""
    return log.isEnabledFor(logging.DEBUG)


def init_ray() -> None:
    """Connect to the cluster named by RAY_ADDRESS, else start Ray embedded on this machine (once)."""
    import ray

    if ray.is_initialized():
        return
    loud = verbose()
    kw = {"runtime_env": {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}, "log_to_driver": loud,
          "logging_level": logging.INFO if loud else logging.WARNING}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**kw)
    else:
        # Logical CPUs above the physical count let the scoring replicas, the train workers and the
        # sampling actors coexist on a laptop; they run one at a time in the driver's loop anyway.
        # address="local": always a fresh embedded instance, never a stray cluster found on the machine.
        ray.init(address="local", num_cpus=max(8, os.cpu_count() or 1), include_dashboard=False, **kw)
    # ray.init sets a SIGTERM handler of its own (exit, and a native stack dump as the process dies): a run
    # stopping on signals takes it back.
    install_stop_handlers()
    ray.data.DataContext.get_current().enable_progress_bars = False
    if not loud:
        for name in RAY_LOGGERS:
            logger = logging.getLogger(name)
            logger.setLevel(logging.WARNING)
            # Also a filter: importing ray.serve later resets its logger's level to INFO, not its filters.
            logger.addFilter(_warnings_and_above)


def ray_logs_dir() -> Path | None:
    """This Ray session's log folder on this node (on a cluster: the driver's node); None without Ray."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None) if ray.is_initialized() else None
    try:  # no public API names the session folder
        return Path(node.get_logs_dir_path()) if node is not None else None
    except Exception:
        return None


def link_ray_logs(run_dir: Path) -> None:
    """``<run>/logs/ray`` → this session's Ray log folder."""
    ray_logs = ray_logs_dir()
    if ray_logs is None or not ray_logs.is_dir():
        return
    link = Path(run_dir) / "logs" / "ray"
    link.parent.mkdir(parents=True, exist_ok=True)
    try:
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(ray_logs, target_is_directory=True)
    except OSError as e:  # a filesystem without symlinks: say where the logs are instead
        log.warning("could not link %s to Ray's logs at %s: %s", link, ray_logs, e)
