"""Storage every node can see: checked before the first step on a multi-node cluster.

Train workers, sampling actors and ingest tasks on any node read the run's dataset versions and policies
from ``run_dir`` and write checkpoints to ``train.storage_path``. A node without the shared volume would
fail deep inside Ray Data or Train; here it is one line naming the node and the setting. The driver writes
a marker file under each local path and a zero-CPU task pinned to every alive node reads it back. URIs
(``s3://``, ``gs://``) are Ray Train's and pyarrow's to reach: not checked.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from pathlib import Path

from qpo_ray.config import RunConfig
from qpo_ray.errors import ConfigError

log = logging.getLogger("qpo_ray")

MARKER = ".qpo-storage-check"
# ([node id], [(path, token)]) → for each node, the marker paths it cannot read
Probe = Callable[[list[str], list[tuple[str, str]]], list[list[str]]]


def read_markers(markers: list[tuple[str, str]]) -> list[str]:
    """The marker paths this process cannot read or whose content is not their token."""
    missing = []
    for path, token in markers:
        try:
            if Path(path).read_text(encoding="utf-8") != token:
                missing.append(path)
        except OSError:
            missing.append(path)
    return missing


def probe_nodes(node_ids: list[str], markers: list[tuple[str, str]]) -> list[list[str]]:
    """``read_markers`` on every node at once, in zero-CPU tasks pinned to each (they run even on a node whose
    CPUs are held)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0, max_retries=0)(read_markers)
    refs = [task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote(markers)
            for n in node_ids]
    return ray.get(refs, timeout=300)


def alive_nodes() -> list[tuple[str, str]]:
    """(node id, address) of every alive node of the connected cluster."""
    import ray

    return [(n["NodeID"], n.get("NodeManagerAddress", "?")) for n in ray.nodes() if n.get("Alive")]


def shared_paths(cfg: RunConfig) -> list[tuple[str, Path]]:
    """(setting, local folder) pairs every node must see: ``run_dir``, and ``train.storage_path`` when it is a
    local path outside ``run_dir``."""
    from qpo_ray.train.trainer import storage_path

    run_dir = Path(cfg.run_dir).resolve()
    out = [("run_dir", run_dir)]
    storage = storage_path(cfg)
    if "://" not in storage:
        path = Path(storage)
        if not path.is_relative_to(run_dir):
            out.append(("train.storage_path", path))
    return out


def check_shared_storage(cfg: RunConfig, *, nodes: Callable[[], list[tuple[str, str]]] = alive_nodes,
                         probe: Probe = probe_nodes) -> None:
    """On a cluster of two or more nodes, every node reads a fresh marker under each ``shared_paths`` folder;
    a node that cannot is a ConfigError naming the node, the path and the setting."""
    have = nodes()
    if len(have) < 2:
        return
    markers: list[tuple[str, str, str]] = []  # (setting, path, token)
    try:
        for setting, folder in shared_paths(cfg):
            folder.mkdir(parents=True, exist_ok=True)
            token = secrets.token_hex(8)
            path = folder / f"{MARKER}-{token}"
            path.write_text(token, encoding="utf-8")
            markers.append((setting, str(path), token))
        pairs = [(p, t) for _, p, t in markers]
        problems = []
        for (node_id, address), missing in zip(have, probe([n for n, _ in have], pairs), strict=True):
            for path in missing:
                setting = next(s for s, p, _ in markers if p == path)
                problems.append(f"node {node_id[:12]} ({address}) cannot read {Path(path).parent} ({setting}="
                                f"{getattr(cfg, setting) if setting == 'run_dir' else cfg.train.storage_path})")
        if problems:
            raise ConfigError("storage not shared by every node: " + "; ".join(problems) + ": put run_dir (and a "
                              "local train.storage_path) on a volume every node mounts at the same path, or set "
                              "train.storage_path to an s3:// or gs:// URI")
        log.info("storage: %d node(s) see %s", len(have), ", ".join(f"{s}={Path(p).parent}" for s, p, _ in markers))
    finally:
        for _, path, _ in markers:
            Path(path).unlink(missing_ok=True)


__all__ = ["check_shared_storage", "probe_nodes", "read_markers", "shared_paths"]
