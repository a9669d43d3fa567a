"""One writer per run directory, and so per dataset (``RUN_DIR/data``): a file lock held for as long as a
process writes there.

The lock is ``RUN_DIR/.writer.lock`` (``filelock``: ``flock`` on POSIX, so the kernel drops it when its holder
dies, however it dies, and a lock left by a dead process is simply taken). Who holds it (PID, host, command,
since when) is written beside it in ``RUN_DIR/.writer.json``, for the one-line refusal a second writer gets at
once. Within one process the lock is re-entrant: a run that holds its directory commits versions into it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from qpo_ray.atomic import atomic_write_json
from qpo_ray.errors import QPOError, ResourceError, os_reason

log = logging.getLogger(__name__)

LOCK_FILE = ".writer.lock"
HOLDER_FILE = ".writer.json"

_guard = threading.Lock()
# run directory -> (its lock, whether taking it created the folder, how many holds in this process)
_held: dict[Path, tuple[FileLock, bool, int]] = {}


class LockedError(QPOError):
    """Another process writes the run directory (or dataset) now."""


def this_command() -> str:
    """The command line of this process, as a person would type it."""
    argv = list(sys.argv) or ["python"]
    if Path(argv[0]).name in ("__main__.py", "qpo-ray"):
        argv[0] = "qpo-ray"
    text = " ".join(argv)
    return text if len(text) <= 300 else text[:297] + "..."


def holder(run_dir: str | Path) -> dict[str, Any] | None:
    """Who holds (or last held, when it died holding it) the lock of ``run_dir``, as recorded beside it."""
    try:
        found = json.loads((Path(run_dir) / HOLDER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def describe(h: dict[str, Any] | None) -> str:
    if not h:
        return "another process (it has not recorded itself yet)"
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(h.get("since", 0))))
    return f"PID {h.get('pid')} on {h.get('host')} ({h.get('command')}) since {since}"


def _acquire(root: Path, command: str) -> tuple[FileLock, bool]:
    created = not root.exists()
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = FileLock(root / LOCK_FILE, timeout=0, thread_local=False)
        lock.acquire()
    except Timeout:
        raise LockedError(f"{root} is being written by {describe(holder(root))}: one writer at a time; "
                          "wait for it to finish or stop it") from None
    except OSError as e:
        raise ResourceError(f"{root}: cannot write there ({os_reason(e)})") from None
    stale = holder(root)
    if stale is not None:
        # The kernel released the lock with its holder: what is left of that writer's work is never trusted
        # (steps without a marker are redone, half-written versions are removed).
        log.info("%s: took over the lock left by %s, which no longer runs", root, describe(stale))
    try:
        atomic_write_json(root / HOLDER_FILE, {"pid": os.getpid(), "host": socket.gethostname(),
                                               "command": command, "since": time.time()})
    except OSError as e:
        _release(root, lock, created)
        raise ResourceError(f"{root}: cannot write there ({os_reason(e)})") from None
    return lock, created


def _release(root: Path, lock: FileLock, created: bool) -> None:
    with suppress(OSError):
        (root / HOLDER_FILE).unlink(missing_ok=True)
    lock.release()
    if created:  # a command that failed before writing anything leaves no folder behind
        with suppress(OSError):
            if [p.name for p in root.iterdir()] == [LOCK_FILE]:
                (root / LOCK_FILE).unlink()
                root.rmdir()


@contextmanager
def writer_lock(run_dir: str | Path, command: str | None = None) -> Iterator[Path]:
    """Hold ``run_dir``'s writer lock inside the block (creating the folder); yields its resolved path.

    A second process is refused at once with a :class:`LockedError` naming the holder."""
    root = Path(run_dir).resolve()
    with _guard:
        lock, created, depth = _held.get(root) or (*_acquire(root, command or this_command()), 0)
        _held[root] = (lock, created, depth + 1)
    try:
        yield root
    finally:
        with _guard:
            lock, created, depth = _held.pop(root)
            if depth > 1:
                _held[root] = (lock, created, depth - 1)
            else:
                _release(root, lock, created)


def holds(run_dir: str | Path) -> bool:
    """Whether this process holds ``run_dir``'s writer lock."""
    return Path(run_dir).resolve() in _held


__all__ = ["HOLDER_FILE", "LOCK_FILE", "LockedError", "describe", "holder", "holds", "this_command", "writer_lock"]
