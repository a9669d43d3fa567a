"""The replay evaluation's policy: its run directory ``out_dir``, trained once and reused after.

The train rows (in a seeded random order: imports are grouped by prompt, and the trainer only shuffles
locally) become dataset v000 of ``out_dir``; the policy is trained there with Ray Train + DeepSpeed
(``train_policy``, schedule ``scratch``). A rerun with the same ``out_dir`` reuses the finished policy, or
resumes an interrupted training from its checkpoint; ``offline_meta.json`` refuses another data, split or
policy/train config.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from qpo_ray.atomic import atomic_write_json
from qpo_ray.config import RunConfig, dump_config
from qpo_ray.data.store import DatasetStore
from qpo_ray.errors import ConfigError, DataError
from qpo_ray.evaluate.split import OfflineSplit, data_fingerprint
from qpo_ray.train.trainer import steps_per_epoch

log = logging.getLogger("qpo_ray")

META_JSON = "offline_meta.json"  # which data and split the run directory was built from
TRAINING_JSON = "offline_training.json"  # written once the policy is trained (wall time, metrics)
POLICY_SUBDIR = "policy"
RUN_NAME = "qpo-offline"
COMMIT_CHUNK = 50_000


def config_fingerprint(cfg: RunConfig) -> str:
    """A short hash of the policy and train config (not where checkpoints go)."""
    d = {"policy": cfg.policy.model_dump(mode="json"), "train": cfg.train.model_dump(mode="json")}
    d["train"].pop("storage_path", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def prepare_out(out_dir: Path, meta: dict[str, Any]) -> DatasetStore:
    """Check that ``out_dir`` is new or was built from the same data, split and config."""
    store = DatasetStore(out_dir)
    store.clean_tmp()
    meta_path = out_dir / META_JSON
    if meta_path.is_file():
        old = json.loads(meta_path.read_text(encoding="utf-8"))
        for key, what in (("data_fingerprint", "dataset"), ("test_fraction", "test fraction"), ("seed", "seed"),
                          ("max_train_queries", "task.max_train_queries"), ("val_fraction", "eval.val_fraction"),
                          ("config_fingerprint", "policy/train config")):
            if old.get(key) != meta[key]:
                raise ConfigError(f"--out {out_dir}: was built with another {what} ({old.get(key)} != "
                                  f"{meta[key]}); use a new --out or delete it")
    elif store.versions():
        raise DataError(f"--out {out_dir}: holds dataset versions but no {META_JSON}; not an offline "
                        "evaluation directory (use a new --out)")
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(meta_path, meta)
    return store


def commit_train(store: DatasetStore, train: pa.Table, seed: int, source: str,
                 reward_range: tuple[float, float]) -> int:
    """Commit the train rows as v000 of the evaluation's run directory, in a seeded random order, with the
    source version's reward range (so rewards normalise as they would in the source run)."""
    perm = np.random.default_rng(seed).permutation(train.num_rows)
    shuffled = train.take(pa.array(perm))
    chunks = (shuffled.slice(i, COMMIT_CHUNK) for i in range(0, shuffled.num_rows, COMMIT_CHUNK))
    m = store.commit(chunks, version=0, reward_range=reward_range, source=source,
                     note=f"offline-eval train split of {source}")
    return m.version


def train_or_reuse(cfg: RunConfig, store: DatasetStore, out_dir: Path) -> dict[str, Any]:
    """Train (or reuse / resume) the policy of ``out_dir``; returns what offline_training.json holds."""
    done = out_dir / TRAINING_JSON
    policy_dir = out_dir / POLICY_SUBDIR
    if done.is_file() and (policy_dir / "policy_config.json").is_file():
        info = json.loads(done.read_text(encoding="utf-8"))
        log.info("offline eval: reusing the trained policy %s (trained in %.1f s)", policy_dir, info["wall_s"])
        return {**info, "reused": True}
    from qpo_ray.ray_init import init_ray
    from qpo_ray.train import train_policy

    tcfg = cfg.train
    rows = store.manifest(0).rows
    init_ray()
    log.info("offline eval: training the policy on %d train rows (%d epochs)", rows, tcfg.scratch.epochs)
    t0 = time.perf_counter()
    res = train_policy(cfg, store=store, version=0, out_dir=policy_dir, schedule="scratch", run_name=RUN_NAME)
    wall = time.perf_counter() - t0
    info = {"wall_s": round(wall, 2), "epochs": tcfg.scratch.epochs, "epochs_run": res.epochs_run,
            "resumed_from_epoch": res.resumed_from_epoch, "train_rows": rows,
            "final_metrics": {k: res.metrics.get(k) for k in ("loss", "ce", "mse", "lr", "tokens_per_s")},
            "epoch_time_s": [round(h.get("epoch_time_s", 0.0), 2) for h in res.history],
            "policy_dir": str(res.policy_dir)}
    atomic_write_json(done, info)
    log.info("offline eval: training took %.1f s", wall)
    return {**info, "reused": False}


def offline_policy(cfg: RunConfig, split: OfflineSplit, data_store: DatasetStore, version: int, data_dir: Path,
                   out_dir: Path, *, fit_margin: bool) -> dict[str, Any]:
    """The policy of ``out_dir`` (``cfg.run_dir``) trained on ``split``'s train rows: checks that they make an
    optimizer step before anything is written, then builds, trains or reuses ``out_dir``. Returns the training
    record (offline_training.json plus ``reused``)."""
    n = split.trained_queries
    limited = split.max_train_queries is not None and n < split.train_queries_available
    steps_per_epoch(cfg.train, split.train.num_rows, f"the train split of {data_dir} v{version:03d}",
                    f" ({n} unique quer{'y' if n == 1 else 'ies'} at --test-fraction {split.test_fraction:g}"
                    + (f", task.max_train_queries={split.max_train_queries}" if limited else "")
                    + (f", {len(split.val_acc)} more held out by eval.val_fraction={cfg.eval.val_fraction:g}"
                       if split.val_acc else "") + ")")
    meta = {"data_run_dir": str(data_dir), "version": version,
            "data_fingerprint": data_fingerprint(data_store, version),
            "test_fraction": split.test_fraction, "seed": split.seed, "max_train_queries": split.max_train_queries,
            "val_fraction": cfg.eval.val_fraction if fit_margin else None,
            "config_fingerprint": config_fingerprint(cfg)}
    store = prepare_out(out_dir, meta)
    dump_config(cfg, out_dir / "config.yaml")
    if store.latest() is None:
        log.info("offline eval: committing %d train rows (%d unique queries) to %s", split.train.num_rows,
                 split.trained_queries, store.root)
        dm = data_store.manifest(version)
        commit_train(store, split.train, split.seed, f"{data_dir} v{version:03d}", (dm.reward_min, dm.reward_max))
    return train_or_reuse(cfg, store, out_dir)


__all__ = ["POLICY_SUBDIR", "TRAINING_JSON", "offline_policy", "train_or_reuse"]
