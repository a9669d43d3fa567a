"""Can the Ray cluster host what the config asks for? Checked before any Ray work is submitted.

A replica, actor or worker that no node can hold waits forever: Ray's autoscaler prints ``No available node
types can fulfill resource request`` every 30 s and nothing else happens (``qpo-ray run --config paper`` on a
cluster without GPUs). Here that is one error line naming the config keys, at once, or after
``resource_wait_s`` on a cluster (``RAY_ADDRESS``) whose autoscaler may still add nodes.

A run's steps take turns: the scoring pool (bootstrap, score, eval), the Train workers (train) and the
sampling actors (collect). Ray Data's ingest tasks ask for no CPU (``train.loader``), so nothing else holds a
CPU or GPU. The pool stays up through training and sampling when the cluster holds it beside them; else it is
released before the policy trains and started again for the next score (a held GPU pool would leave a
cluster that has room for only one of them idle: ``plan_pool``). So every single replica, worker and actor
must fit on one node, and each of the three groups must fit the cluster's totals.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from qpo_ray.config import CollectConfig, RunConfig, TargetConfig, TrainConfig
from qpo_ray.errors import ConfigError

log = logging.getLogger("qpo_ray")

Node = dict[str, float]  # a node's total resources, as Ray reports them ("CPU", "GPU", ...)
Phase = Sequence["Need"]  # what runs at the same time
POLL_S = 5.0
LOG_EVERY_S = 30.0


@dataclass(frozen=True)
class Need:
    """``units`` copies of one thing (a replica, a worker, an actor), each on one node; ``keys`` name the config
    keys that ask for it."""

    what: str
    keys: str
    units: int
    cpus: float
    gpus: float


def target_need(t: TargetConfig) -> Need:
    """The scoring pool's replicas (an autoscaling pool starts with ``min_replicas``, at least one)."""
    if t.autoscaling:
        a = t.autoscaling
        units = max(1, int(a.get("min_replicas") or 0), int(a.get("initial_replicas") or 0))
        count = f"target.autoscaling.min_replicas={units}"
    else:
        units, count = t.num_replicas, f"target.num_replicas={t.num_replicas}"
    return Need("target replica", f"{count}, target.num_cpus_per_replica={t.num_cpus_per_replica:g}, "
                f"target.num_gpus_per_replica={t.num_gpus_per_replica:g}", units, t.num_cpus_per_replica,
                t.num_gpus_per_replica)


def train_need(t: TrainConfig) -> Need:
    return Need("train worker", f"train.num_workers={t.num_workers}, train.cpus_per_worker={t.cpus_per_worker:g}, "
                f"train.use_gpu={str(t.use_gpu).lower()}", t.num_workers, t.cpus_per_worker, 1.0 if t.use_gpu else 0.0)


def collect_need(c: CollectConfig) -> Need:
    return Need("sampling actor", f"collect.num_actors={c.num_actors}, collect.num_cpus_per_actor="
                f"{c.num_cpus_per_actor:g}, collect.num_gpus_per_actor={c.num_gpus_per_actor:g}", c.num_actors,
                c.num_cpus_per_actor, c.num_gpus_per_actor)


def run_phases(cfg: RunConfig, *, hold_pool: bool = False) -> list[list[Need]]:
    """What a ``qpo-ray run`` holds at once: the pool, the Train workers, the sampling actors, one after the
    other; with ``hold_pool``, the pool beside each of the other two."""
    pool = target_need(cfg.target)
    if cfg.loops == 0:
        return [[pool]]
    train, sample = train_need(cfg.train), collect_need(cfg.collect)
    return [[pool, train], [pool, sample]] if hold_pool else [[pool], [train], [sample]]


def peak(phases: Sequence[Phase]) -> tuple[float, float]:
    """The most CPUs and GPUs any phase holds at once (what a cluster of the preflight's size has)."""
    sums = [(sum(n.units * n.cpus for n in ph), sum(n.units * n.gpus for n in ph)) for ph in phases]
    return max(c for c, _ in sums), max(g for _, g in sums)


def _fits(need: Need, node: Node) -> bool:
    return node.get("CPU", 0.0) >= need.cpus and node.get("GPU", 0.0) >= need.gpus


def _shapes(nodes: Sequence[Node]) -> str:
    shapes = sorted({(n.get("CPU", 0.0), n.get("GPU", 0.0)) for n in nodes}, reverse=True)
    text = ", ".join(f"{c:g} CPU/{g:g} GPU" for c, g in shapes[:4])
    return f"{len(nodes)} node(s): {text}{', ...' if len(shapes) > 4 else ''}"


def phase_shortfalls(phase: Phase, nodes: Sequence[Node]) -> list[str]:
    """Why ``phase`` cannot run on ``nodes`` (empty when it can). Totals are checked only once every single unit
    fits a node: the per-unit line is the one that names the fix."""
    if not nodes:
        return ["the cluster has no alive node"]
    out = [f"no node can hold one {n.what} ({n.cpus:g} CPU, {n.gpus:g} GPU; {n.keys}); the cluster has "
           f"{_shapes(nodes)}" for n in phase if n.units and not any(_fits(n, node) for node in nodes)]
    if out:
        return out
    cpus, gpus = sum(n.units * n.cpus for n in phase), sum(n.units * n.gpus for n in phase)
    have_cpu, have_gpu = sum(n.get("CPU", 0.0) for n in nodes), sum(n.get("GPU", 0.0) for n in nodes)
    if cpus > have_cpu + 1e-9 or gpus > have_gpu + 1e-9:
        what = " + ".join(f"{n.units} {n.what}(s)" for n in phase)
        keys = "; ".join(n.keys for n in phase)
        out.append(f"{what} need {cpus:g} CPU and {gpus:g} GPU at once ({keys}); the cluster has {have_cpu:g} CPU "
                   f"and {have_gpu:g} GPU in all")
    return out


def shortfalls(phases: Sequence[Phase], nodes: Sequence[Node]) -> list[str]:
    """Every reason the phases cannot run on ``nodes``, each once."""
    return list(dict.fromkeys(p for phase in phases for p in phase_shortfalls(phase, nodes)))


def cluster_nodes() -> list[Node]:
    """Total resources of each alive node of the connected cluster."""
    import ray

    return [{k: float(v) for k, v in n["Resources"].items()} for n in ray.nodes() if n.get("Alive")]


def request_resources(bundles: list[dict[str, float]]) -> None:
    """Ask the autoscaler (if any) for room for ``bundles``; an empty list withdraws the request."""
    from ray.autoscaler.sdk import request_resources as ray_request

    try:
        ray_request(bundles=bundles)
    except Exception as e:  # no autoscaler API on this cluster: waiting may still see nodes join
        log.warning("could not ask the autoscaler for %d bundle(s): %s", len(bundles), e)


def _bundles(phase: Phase) -> list[dict[str, float]]:
    return [{"CPU": n.cpus, "GPU": n.gpus} if n.gpus else {"CPU": n.cpus} for n in phase for _ in range(n.units)]


def check_cluster(phases: Sequence[Phase], *, wait_s: float, can_grow: bool,
                  nodes: Callable[[], list[Node]] = cluster_nodes,
                  request: Callable[[list[dict[str, float]]], None] = request_resources,
                  poll_s: float = POLL_S) -> None:
    """Return when the cluster can host ``phases``; else a ConfigError naming the keys. On a cluster that can
    grow, first ask its autoscaler for the first phase that does not fit and wait up to ``wait_s``."""
    problems = shortfalls(phases, nodes())
    if not problems:
        return
    waited = can_grow and wait_s > 0
    if waited:
        problems = _wait(phases, problems, wait_s, nodes, request, poll_s)
        if not problems:
            return
    if not can_grow and os.environ.get("RAY_ADDRESS"):
        hint = " (the cluster has no autoscaler that adds nodes: give it more, or lower those keys)"
    elif not can_grow:
        hint = " (embedded Ray: this machine is the whole cluster; set RAY_ADDRESS to use another one)"
    elif waited:
        hint = f" (waited {wait_s:g} s: resource_wait_s)"
    else:
        hint = " (on a cluster whose autoscaler adds nodes, set resource_wait_s to wait for them)"
    raise ConfigError("the Ray cluster cannot host what the config asks for: " + "; ".join(problems) + hint)


def _wait(phases: Sequence[Phase], problems: list[str], wait_s: float, nodes: Callable[[], list[Node]],
          request: Callable[[list[dict[str, float]]], None], poll_s: float) -> list[str]:
    deadline = time.monotonic() + wait_s
    next_log, asked = 0.0, None
    try:
        while problems and time.monotonic() < deadline:
            have = nodes()
            failing = [ph for ph in phases if phase_shortfalls(ph, have)]
            bundles = _bundles(failing[0]) if failing else []
            if bundles != asked:
                request(bundles)
                asked = bundles
            if time.monotonic() >= next_log:
                log.warning("waiting up to %.0f s more for the cluster: %s", deadline - time.monotonic(),
                            "; ".join(problems))
                next_log = time.monotonic() + LOG_EVERY_S
            time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
            problems = shortfalls(phases, nodes())
    finally:
        if asked:
            request([])  # a standing request would keep the nodes up after the run
    return problems


def autoscaler_adds_nodes(status: Callable[[], dict | None] | None = None) -> bool:
    """Whether the connected cluster can grow: never embedded Ray; on a cluster (``RAY_ADDRESS``), unless its
    autoscaler only mirrors the nodes it has. A cluster started by hand (``ray start``, KubeRay without
    ``enableInTreeAutoscaling``) runs the autoscaler "readonly", which names every node type ``node_<id>``."""
    if not os.environ.get("RAY_ADDRESS"):
        return False
    report = ((status or _autoscaler_status)() or {}).get("autoscaler_report") or {}
    types = {*(report.get("active_nodes") or {}), *(report.get("idle_nodes") or {}),
             *(report.get("pending_launches") or {}), *(report.get("node_type_mapping") or {}).values()}
    if not types:
        return True  # nothing reported yet (or autoscaler v2): assume it may grow (a wait beats a false refusal)
    return not all(t.startswith("node_") for t in types)


def _autoscaler_status() -> dict | None:
    """The autoscaler's last report, as ``ray status`` reads it (GCS key-value store)."""
    import json

    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    try:  # no public API says whether a cluster has an autoscaler that adds nodes
        raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
        return json.loads(raw) if raw else None
    except Exception:
        return None


def ensure_cluster(cfg: RunConfig, phases: Sequence[Phase]) -> None:
    """Connect to (or start) Ray, then ``check_cluster`` with the config's ``resource_wait_s``."""
    from qpo_ray.ray_init import init_ray

    init_ray()
    check_cluster(phases, wait_s=cfg.resource_wait_s, can_grow=autoscaler_adds_nodes())


def plan_pool(cfg: RunConfig, nodes: Callable[[], list[Node]] = cluster_nodes) -> bool:
    """Whether the scoring pool is held through training and sampling (True: the cluster holds it beside
    them) or released for them; logs the preflight's figure. After ``ensure_cluster``."""
    have = nodes()
    hold = not shortfalls(run_phases(cfg, hold_pool=True), have)
    log.info(preflight_line(cfg, have, hold))
    return hold


def preflight_line(cfg: RunConfig, nodes: Sequence[Node], hold: bool) -> str:
    cpu, gpu = peak(run_phases(cfg))
    groups = "; ".join(f"{n.units} {n.what}(s) {n.units * n.cpus:g} CPU/{n.units * n.gpus:g} GPU"
                       for ph in run_phases(cfg) for n in ph)
    line = f"preflight: the run needs {cpu:g} CPU and {gpu:g} GPU at once ({groups}, one group at a time); " \
           f"the cluster has {_shapes(nodes)}"
    if cfg.loops == 0:
        return line
    held_cpu, held_gpu = peak(run_phases(cfg, hold_pool=True))
    if hold:
        return line + f": the scoring pool stays up through training and sampling ({held_cpu:g} CPU/{held_gpu:g} GPU)"
    return line + (f": the scoring pool is released while the policy trains and samples (beside them it would "
                   f"need {held_cpu:g} CPU/{held_gpu:g} GPU)")
