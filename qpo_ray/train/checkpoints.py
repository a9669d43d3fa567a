"""Checkpoints of a training run in Ray Train's storage: the layout, the completion markers, reading back.

A checkpoint directory (one per epoch, ``epoch-NNNN``) holds::

    epoch.json   completed epochs + the metrics history (rank 0)
    latest       DeepSpeed's tag pointer
    state/       DeepSpeed engine state: model states (rank 0) and one ZeRO shard file per rank
    policy/      the full policy in QPOPolicy.save format (last epoch only)

Ray Train merges the per-rank directories of a report into that one folder in storage.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

EPOCH_FILE = "epoch.json"
POLICY_DIR = "policy"
# ``<storage>/<run>/.complete/epoch-NNNN``: written by rank 0 once every rank has uploaded that checkpoint.
# A worker that dies soon after reporting can die before Ray Train's controller has registered the report;
# the restarted worker group then gets no (or an older) checkpoint from ``get_checkpoint()``. The markers
# let it find the newest complete checkpoint in storage itself.
COMPLETE_DIR = ".complete"
DS_TAG = "state"  # one DeepSpeed tag per checkpoint folder: each epoch gets its own folder anyway


def checkpoint_epoch(path: str) -> int:
    """The epoch an ``epoch-NNNN`` folder or marker holds; -1 for any other name."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return int(name.split("-", 1)[1]) if name.startswith("epoch-") and name[6:].isdigit() else -1


def newest_complete_checkpoint(storage: str, run_name: str):
    """The newest checkpoint of run ``run_name`` that every rank finished uploading (its marker exists and
    its folder still holds ``epoch.json``), as a ``ray.train.Checkpoint``; None when there is none."""
    import pyarrow.fs as pafs
    import ray.train

    fs, root = pafs.FileSystem.from_uri(storage)
    run = f"{root.rstrip('/')}/{run_name}"
    markers = fs.get_file_info(pafs.FileSelector(f"{run}/{COMPLETE_DIR}", allow_not_found=True))
    for name in sorted((m.base_name for m in markers), key=checkpoint_epoch, reverse=True):
        if checkpoint_epoch(name) > 0 and fs.get_file_info(f"{run}/{name}/{EPOCH_FILE}").type == pafs.FileType.File:
            return ray.train.Checkpoint(path=f"{run}/{name}", filesystem=fs)
    return None


def mark_complete(storage: str, run_name: str, dir_name: str) -> None:
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(storage)
    folder = f"{root.rstrip('/')}/{run_name}/{COMPLETE_DIR}"
    fs.create_dir(folder, recursive=True)
    with fs.open_output_stream(f"{folder}/{dir_name}") as f:
        f.write(b"")


STOP_DIR = ".stopped"  # ``<storage>/<run>/.stopped/<call id>.json``: why the workers of that call stopped early


def write_stop(storage: str, run_name: str, call_id: str, info: dict[str, Any]) -> None:
    """Rank 0's record that training call ``call_id`` stopped before its last epoch, and why (Ray Train V2
    hands the driver the metrics of checkpoints only, and a stopped run reports none)."""
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(storage)
    folder = f"{root.rstrip('/')}/{run_name}/{STOP_DIR}"
    fs.create_dir(folder, recursive=True)
    with fs.open_output_stream(f"{folder}/{call_id}.json") as f:
        f.write(json.dumps(info).encode("utf-8"))


def read_stop(storage: str, run_name: str, call_id: str) -> dict[str, Any] | None:
    """What ``write_stop`` recorded for ``call_id``; None when that call did not stop early."""
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(storage)
    path = f"{root.rstrip('/')}/{run_name}/{STOP_DIR}/{call_id}.json"
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return json.loads(f.read().decode("utf-8"))


def latest_checkpoint(registered, storage: str, run_name: str):
    """Ray Train's latest registered checkpoint, or a newer complete one in storage (written by a worker
    whose controller died before registering it, e.g. with a killed driver); None when there is neither."""
    found = newest_complete_checkpoint(storage, run_name)
    if found is None or (registered is not None and checkpoint_epoch(registered.path) >= checkpoint_epoch(found.path)):
        return registered
    log.info("qpo-ray train: using %s, newer than Ray Train's latest registered checkpoint (%s)",
             found.path, registered.path if registered is not None else "none")
    return found


def read_checkpoint_json(checkpoint, name: str) -> dict[str, Any]:
    """A small file from a checkpoint, through its own filesystem (works for local, NFS, s3://, gs://)."""
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{name}") as f:
        return json.loads(f.read().decode("utf-8"))


def copy_policy_out(checkpoint, out_dir: Path) -> None:
    """Copy ``policy/`` from the checkpoint to ``out_dir`` (atomically replaced), without downloading the
    optimizer shards."""
    import pyarrow.fs as pafs

    out_dir = out_dir.resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".tmp-{out_dir.name}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        pafs.copy_files(f"{checkpoint.path}/{POLICY_DIR}", str(tmp), source_filesystem=checkpoint.filesystem,
                        destination_filesystem=pafs.LocalFileSystem())
        old = None
        if out_dir.exists():
            old = out_dir.parent / f".old-{out_dir.name}-{uuid.uuid4().hex[:8]}"
            os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["COMPLETE_DIR", "DS_TAG", "EPOCH_FILE", "POLICY_DIR", "STOP_DIR", "checkpoint_epoch", "copy_policy_out",
           "latest_checkpoint", "mark_complete", "newest_complete_checkpoint", "read_checkpoint_json", "read_stop",
           "write_stop"]
