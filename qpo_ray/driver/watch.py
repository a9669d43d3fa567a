"""No silent hang: a step that makes no progress while Ray has resource demands it cannot place says so.

The preflight (``qpo_ray.resources``) checks the cluster once, before the run; this watches each step. When
Ray has pending demands (tasks, actors, placement groups waiting for CPUs or GPUs) and the step's progress
meters have not moved for ``WARN_S``, the driver logs what is pending and the config keys that ask for that
shape, every ``WARN_S``. On a cluster whose autoscaler adds nodes it waits up to ``resource_wait_s``; on a
fixed cluster (embedded Ray, ``ray start``) nothing will come, so after ``FIXED_FAIL_S`` the step stops
with one line.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from qpo_ray import progress
from qpo_ray.errors import ConfigError
from qpo_ray.resources import Need

log = logging.getLogger("qpo_ray")

Demand = tuple[dict[str, float], int]  # a bundle shape ({"CPU": 1.0}) and how many wait for it
WARN_S = 30.0  # a stall is reported after this long, and again every WARN_S
FIXED_FAIL_S = 60.0  # a fixed cluster gives up after this long
POLL_S = 5.0


def pending_demands() -> list[Demand]:
    """What Ray's tasks, actors and placement groups wait for now (``ray status``'s "Pending Demands"), from
    the GCS: reported by every raylet, autoscaler or not."""
    import ray
    from ray.autoscaler.v2.sdk import get_cluster_status

    demands = get_cluster_status(ray.get_runtime_context().gcs_address).resource_demands
    out: list[Demand] = []
    for d in [*demands.ray_task_actor_demand, *demands.placement_group_demand]:
        out += [({k: float(v) for k, v in b.bundle.items()}, int(b.count)) for b in d.bundles_by_count]
    return out


def _shape(bundle: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(bundle.items())) + "}"


def describe(demands: Sequence[Demand], needs: Sequence[Need]) -> str:
    """The pending bundles, each with the config keys of the replicas, workers or actors of that shape."""
    parts = []
    for bundle, count in demands:
        cpu, gpu = bundle.get("CPU", 0.0), bundle.get("GPU", 0.0)
        keys = [f"{n.what}: {n.keys}" for n in needs if (n.cpus, n.gpus) == (cpu, gpu)]
        parts.append(f"{count} × {_shape(bundle)} (" + ("; ".join(dict.fromkeys(keys)) if keys else
                     "no key of this run asks for that shape: another job on the cluster?") + ")")
    return ", ".join(parts)


class Watchdog:
    """Watches one step. ``check`` runs every poll: it logs a stall and returns the line to fail with once
    the stall has lasted ``fail_s``. Clock, demands and progress are injectable for tests."""

    def __init__(self, step: str, needs: Sequence[Need], *, fail_s: float, can_grow: bool,
                 demands: Callable[[], list[Demand]] = pending_demands,
                 last_progress: Callable[[], float] = progress.last_progress,
                 clock: Callable[[], float] = time.monotonic, warn_s: float = WARN_S):
        self.step, self.needs, self.fail_s, self.can_grow, self.warn_s = step, list(needs), fail_s, can_grow, warn_s
        self.demands, self.last_progress, self.clock = demands, last_progress, clock
        self.started = clock()
        self.pending_since: float | None = None
        self.next_warn = 0.0
        self.failure: str | None = None

    def check(self) -> str | None:
        now = self.clock()
        try:
            pending = self.demands()
        except Exception as e:  # the GCS slow to answer: watching is best effort, the step goes on
            log.debug("could not read Ray's pending demands: %s", e)
            return None
        if not pending:
            self.pending_since = None
            return None
        if self.pending_since is None:
            self.pending_since = now
        stalled = now - max(self.started, self.pending_since, self.last_progress())
        if stalled < self.warn_s:
            return None
        what = describe(pending, self.needs)
        if stalled >= self.fail_s:
            grow = "its autoscaler added nothing in resource_wait_s" if self.can_grow else \
                "the cluster has no autoscaler to add them"
            self.failure = (f"[{self.step}] no progress for {stalled:.0f} s while Ray waits for {what}; {grow}: give "
                            f"the cluster the resources or lower those keys (the preflight's figure is a minimum: "
                            f"another job may be holding them)")
            return self.failure
        if now >= self.next_warn:
            self.next_warn = now + self.warn_s
            until = "" if not self.can_grow else f", waiting up to {self.fail_s - stalled:.0f} s more (resource_wait_s)"
            log.warning("[%s] no progress for %.0f s while Ray waits for %s%s", self.step, stalled, what, until)
        return None


@contextmanager
def watch(step: str, needs: Sequence[Need], *, fail_s: float, can_grow: bool, poll_s: float = POLL_S,
          **kw) -> Iterator[Watchdog]:
    """Run the block under a ``Watchdog`` polled by a thread; when it gives up, the block is interrupted
    (SIGINT to the main thread: a ``ray.get`` or a lock wait returns) and raises the watchdog's ConfigError."""
    dog = Watchdog(step, needs, fail_s=fail_s, can_grow=can_grow, **kw)
    stop, lock = threading.Event(), threading.Lock()
    # Only the main thread takes signals; a block run elsewhere sees the failure when it returns.
    main = threading.main_thread() if threading.current_thread() is threading.main_thread() else None

    def poll() -> None:
        while not stop.wait(poll_s):
            if dog.check() is not None:
                with lock:  # never after the block has ended
                    if main is not None and not stop.is_set():
                        signal.pthread_kill(main.ident, signal.SIGINT)
                return

    thread = threading.Thread(target=poll, name=f"qpo-watch-{step}", daemon=True)
    thread.start()
    try:
        try:
            yield dog
        finally:
            with lock:
                stop.set()
            thread.join(timeout=poll_s + 5)
    except BaseException:
        if dog.failure is not None:  # the interrupt, or what the interrupted block raised
            raise ConfigError(dog.failure) from None
        raise
    if dog.failure is not None:  # the block returned before the interrupt reached it
        raise ConfigError(dog.failure)

__all__ = ["Watchdog", "describe", "pending_demands", "watch"]
