"""The scoring pool: a Ray Serve deployment of target-engine replicas and the driver-side client.

``ScoringPool`` deploys one Serve application per run (``serve.run(..., name=<app>, route_prefix=None)``:
reachable only through its handle, never over HTTP), fans requests out through the DeploymentHandle with
at most ``target.max_in_flight`` outstanding, and re-sends a request whose replica died. Replicas group
concurrent requests into engine batches, formed when the engine is free (``score.batcher``, not
``@serve.batch``: see there why). Results come back in input order.

A request is counted (calls, tokens) only when its result is returned, so a request retried after a
replica died is still counted once.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import contextmanager
from typing import Any

from ray import serve
from ray.exceptions import ActorAlreadyExistsError, RayActorError, RayTaskError, WorkerCrashedError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

from qpo_ray.config import TargetConfig
from qpo_ray.errors import QPOError, TargetError
from qpo_ray.progress import bar
from qpo_ray.ray_init import init_ray
from qpo_ray.score.batcher import EngineBatcher
from qpo_ray.score.engines import Components, ScoreRequest, TargetEngine, make_engine
from qpo_ray.score.pairs import score_pairs  # noqa: F401  (re-exported: the driver imports it from here)
from qpo_ray.tasks import Task

log = logging.getLogger(__name__)

# The replica (or its process) is gone or not reachable yet: sending the request again is safe.
RETRYABLE = (RayActorError, WorkerCrashedError, ReplicaUnavailableError, DeploymentUnavailableError,
             BackPressureError)
BACKOFF_S = 0.5
DEPLOYMENT = "TargetReplica"
EngineFactory = Callable[[TargetConfig, list[Task]], TargetEngine]


def serve_running() -> bool:
    """Whether Serve's controller runs on the connected cluster (without starting it)."""
    from ray.util import list_named_actors

    return any(a["namespace"] == "serve" and a["name"] == "SERVE_CONTROLLER_ACTOR"
               for a in list_named_actors(all_namespaces=True))


def _start_serve() -> bool:
    """Start Serve without HTTP proxies, or connect to the running one; True when this call started it."""
    started = not serve_running()
    try:
        serve.start(proxy_location="Disabled")
    except ActorAlreadyExistsError:
        # Another driver on the cluster (a second run starting at the same moment) created Serve's controller
        # between our check and our start: connect to that one.
        serve.start(proxy_location="Disabled")
        started = False
    return started


@serve.deployment(name=DEPLOYMENT)
class TargetReplica:
    """One copy of the target engine; concurrent requests are grouped into engine batches."""

    def __init__(self, cfg: dict[str, Any], tasks: list[Task], engine_factory: EngineFactory | None = None):
        target = TargetConfig.model_validate(cfg)
        self.engine = (engine_factory or make_engine)(target, tasks)
        # One bad request (e.g. oversized) fails alone: the batcher reruns a failed batch request by request.
        self.batcher = EngineBatcher(self.engine.score, target.max_batch_size, target.batch_wait_timeout_s)

    async def __call__(self, req: ScoreRequest) -> Components:
        return await self.batcher.submit(req)


def build_app(cfg: TargetConfig, tasks: Sequence[Task], engine_factory: EngineFactory | None = None):
    """The Serve application: replicas and resources from ``cfg``."""
    opts: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": cfg.num_cpus_per_replica, "num_gpus": cfg.num_gpus_per_replica},
        # Room for a full batch being scored plus the next one forming.
        "max_ongoing_requests": 2 * cfg.max_batch_size,
    }
    if cfg.autoscaling:
        opts["autoscaling_config"] = cfg.autoscaling
    else:
        opts["num_replicas"] = cfg.num_replicas
    return TargetReplica.options(**opts).bind(cfg.model_dump(mode="json"), list(tasks), engine_factory)


def _root_cause(text: str) -> str:
    """The most specific error line of a Serve deployment failure (the replica's own exception)."""
    lines = [ln.strip() for ln in text.splitlines() if re.match(r"^\s*[\w.]*(Error|Exception): ", ln)]
    ours = [ln for ln in lines if re.match(r"^[\w.]*(ModelSource|Target|Config|Data|QPO)Error: ", ln)]
    return (ours or lines or [ln for ln in text.splitlines() if ln.strip()][-1:] or ["unknown error"])[-1]


class ScoringPool:
    """Context manager around a per-run Serve application of target replicas."""

    def __init__(self, cfg: TargetConfig, tasks: Task | Iterable[Task], *, app_name: str | None = None,
                 run_id: str | None = None, engine_factory: EngineFactory | None = None):
        self.cfg = cfg
        self.tasks = [tasks] if isinstance(tasks, Task) else list(tasks)
        self.target = cfg.model
        self.app_name = app_name or f"qpo-target-{run_id or uuid.uuid4().hex[:8]}"
        self.engine_factory = engine_factory
        self.meter = None  # set by ``progress``: one display across several score() calls
        self.handle = None
        self._started_serve = False
        self.stats: dict[str, float] = {"requests": 0, "calls": 0, "tokens": 0, "retries": 0, "seconds": 0.0}
        self._lock = threading.Lock()

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> ScoringPool:
        """Deploy the pool's Serve application and wait until it answers; returns self. A pool that runs
        already is left as it is; a closed one deploys again (its ``stats`` go on counting)."""
        if self.handle is not None:
            return self
        init_ray()
        # Handle-only traffic: start Serve without HTTP proxies unless something already started it.
        self._started_serve = _start_serve()
        t0 = time.time()
        log.info("scoring pool '%s' starting (%s, %s)", self.app_name, self.cfg.engine, self.cfg.model)
        app = build_app(self.cfg, self.tasks, self.engine_factory)
        try:
            self.handle = serve.run(app, name=self.app_name, route_prefix=None)
        except Exception as e:  # e.g. the model cannot be loaded: one clear line, not a replica traceback
            reason = _root_cause(self._deployment_message() or str(e))
            self.handle = object()  # so that close() cleans up
            self.close()
            raise TargetError(f"scoring pool '{self.app_name}' did not start ({self.cfg.engine}, "
                              f"{self.cfg.model}): {reason}") from e
        log.info("scoring pool '%s' ready in %.1fs (%s, %s)", self.app_name, time.time() - t0, self.cfg.engine,
                 self.cfg.model)
        return self

    def close(self) -> None:
        """Delete the application, waiting until its replicas are gone (their CPUs and GPUs are free then).

        Serve itself stays: on a shared cluster another run may be between its ``serve.start`` and
        ``serve.run``, and its idle controller holds no CPU. On embedded Ray it ends with Ray at the process's
        exit. ``serve.shutdown()`` is not called: it waits on the controller's ``graceful_shutdown`` until the
        controller kills itself, and Ray reports that call and the handle's ``listen_for_change`` as failed
        tasks on the console ("The actor is dead because it was killed by `ray.kill`").
        """
        if self.handle is not None:
            self.handle = None
            try:
                serve.delete(self.app_name)
            except Exception as e:  # the cluster may already be gone at interpreter exit
                log.warning("could not delete Serve app '%s': %s", self.app_name, e)

    def __enter__(self) -> ScoringPool:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def _deployment_message(self) -> str:
        try:
            return serve.status().applications[self.app_name].deployments[DEPLOYMENT].message
        except Exception:
            return ""

    def replica_actor_names(self) -> list[str]:
        """Names of this pool's live replica actors (namespace ``serve``), e.g. for ``ray.kill`` in drills.

        Read from the GCS's named-actor table, which needs no dashboard (unlike ``ray.util.state``).
        """
        from ray.util import list_named_actors

        prefix = f"SERVE_REPLICA::{self.app_name}#{DEPLOYMENT}#"
        return sorted(a["name"] for a in list_named_actors(all_namespaces=True)
                      if a["namespace"] == "serve" and a["name"].startswith(prefix))

    # -- scoring ------------------------------------------------------------------------------------
    def _one(self, req: ScoreRequest) -> Components:
        attempt = 0
        while True:
            try:
                return self.handle.remote(req).result()
            except Exception as e:  # sorted below: retryable, the user's error, or anything else
                # Ray may hand an actor death over bare or wrapped in a RayTaskError.
                cause = e.cause if isinstance(e, RayTaskError) and isinstance(e.cause, Exception) else e
                if isinstance(cause, QPOError):
                    raise type(cause)(str(cause)) from None
                if not isinstance(cause, RETRYABLE):
                    raise TargetError(f"scoring pool '{self.app_name}': the replica raised "
                                      f"{type(cause).__name__}: {cause}") from None
                if attempt >= self.cfg.retries:
                    raise TargetError(f"scoring pool '{self.app_name}': request failed after {attempt + 1} "
                                      f"attempt(s), the replica kept failing: {type(cause).__name__}") from None
                with self._lock:
                    self.stats["retries"] += 1
                log.warning("replica failed (%s); re-sending the request", type(cause).__name__)
                time.sleep(BACKOFF_S * 2**attempt)
                attempt += 1

    @contextmanager
    def progress(self, total: int, desc: str) -> Iterator[None]:
        """Show the score() calls inside the block as one step of ``total`` requests."""
        self.meter = bar(total, desc, unit="req")
        try:
            yield
        finally:
            self.meter.close()
            self.meter = None

    def score(self, requests: Sequence[ScoreRequest], progress: bool = True) -> list[Components]:
        """Components of every request, in input order. Progress goes to the block's meter inside
        ``progress()``, else to a meter of this call's own."""
        if self.handle is None:
            raise TargetError("ScoringPool.score called before start() (or `with ScoringPool(...)`)")
        t0 = time.time()
        results: list[Components | None] = [None] * len(requests)
        # `is None`, not truthiness: a tqdm of total 0 is falsy.
        meter = self.meter if self.meter is not None else bar(len(requests), "score", unit="req", enabled=progress)
        with ThreadPoolExecutor(max_workers=self.cfg.max_in_flight, thread_name_prefix="qpo-pool") as ex:
            pending = {ex.submit(self._one, r): i for i, r in enumerate(requests)}
            try:
                while pending:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in done:
                        i = pending.pop(fut)
                        results[i] = comp = fut.result()
                        self.stats["calls"] += comp.calls
                        self.stats["tokens"] += comp.tokens
                    meter.update(len(done))
                    if self.stats["retries"]:
                        meter.set_postfix_str(f"{int(self.stats['retries'])} retried", refresh=False)
            except BaseException:
                for fut in pending:
                    fut.cancel()
                raise
            finally:
                if meter is not self.meter:
                    meter.close()
        self.stats["requests"] += len(requests)
        self.stats["seconds"] += time.time() - t0
        return results  # type: ignore[return-value]
