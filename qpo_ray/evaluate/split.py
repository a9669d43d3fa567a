"""The replay evaluation's data: the dataset version to read and its rows split by unique query text.

``split_of`` (a seeded hash of the normalised query text) puts every question on one side, so repeats of a
question never sit on both. With ``eval.rerank_margin: fit``, a seeded ``eval.val_fraction`` of the train
queries is held out of training to fit rerank's margin; ``task.max_train_queries`` trains on a seeded sample.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from qpo_ray.config import RunConfig
from qpo_ray.data.schema import SCHEMA, normalize_text, split_of
from qpo_ray.data.store import DatasetStore, parse_version_path
from qpo_ray.errors import ConfigError, DataError
from qpo_ray.evaluate.compare import AccTable, accuracy_table, prompt_names

log = logging.getLogger("qpo_ray")


def resolve_data(data_run_dir: str | Path, version: int | None) -> tuple[DatasetStore, int, Path]:
    """The store and version to read. ``data_run_dir`` may also be ``RUN_DIR/data/vNNN``."""
    p = Path(data_run_dir)
    if not p.exists():
        raise DataError(f"--data {data_run_dir}: no such run directory")
    if not p.is_dir():
        raise DataError(f"--data {data_run_dir}: not a directory")
    p = p.resolve()
    if (found := parse_version_path(p)) is not None:
        p, v = found
        if version is not None and version != v:
            raise ConfigError(f"--data {data_run_dir} names v{v:03d} but --version is {version}")
        version = v
    store = DatasetStore(p)
    have = store.versions()
    if not have:
        raise DataError(f"--data {data_run_dir}: no dataset versions in {store.root} (import logs first: "
                        "qpo-ray data import --format oirl --split all --run-dir RUN_DIR …)")
    if version is None:
        m = store.manifest(have[-1])
        while m.new_rows == 0 and m.parent is not None:  # a version that added nothing holds its parent's rows
            m = store.manifest(m.parent)
        if m.rows == 0:
            raise DataError(f"--data {data_run_dir}: dataset v{m.version:03d} is empty (import logs first)")
        if m.version != have[-1]:
            log.warning("--data %s: the latest dataset v%03d added no rows; using v%03d, the newest that did",
                        data_run_dir, have[-1], m.version)
        version = m.version
    elif version not in have:
        raise DataError(f"--version {version}: no dataset v{version:03d} in {store.root} "
                        f"(have {', '.join(f'v{v:03d}' for v in have)})")
    store.verify(version)
    return store, version, p


def data_fingerprint(store: DatasetStore, version: int) -> str:
    """A short hash of the version's files: an evaluation directory stays tied to the data it was built from."""
    m = store.manifest(version)
    return hashlib.sha256("".join(f.sha256 for f in m.files).encode()).hexdigest()[:16]


class OfflineSplit:
    """The rows of a version split by unique query text, as arrow tables plus the per-query accuracy."""

    def __init__(self, store: DatasetStore, version: int, test_fraction: float, seed: int):
        side: dict[str, str] = {}  # raw query text -> split (split_of is per normalised text)
        train_parts: list[pa.Table] = []
        test_rows: list[dict[str, Any]] = []
        combos: Counter = Counter()
        self.rows = 0
        self.test_fraction, self.seed = test_fraction, seed
        cols = ["query", "prompt", "correct", "reward", "source"]
        for batch in store.iter_batches(version):
            t = pa.Table.from_batches([batch], schema=SCHEMA)
            qs = t.column("query").to_pylist()
            mask = []
            for q in qs:
                s = side.get(q)
                if s is None:
                    s = side[q] = split_of(q, test_fraction, seed)
                mask.append(s == "train")
            keep = pa.array(mask)
            train_parts.append(t.filter(keep))
            test_rows += t.filter(pc.invert(keep)).select(cols).to_pylist()
            combos.update(zip(t.column("task").to_pylist(), t.column("target").to_pylist(),
                              t.column("setting").to_pylist(), strict=True))
            self.rows += t.num_rows
        if len(combos) > 1:
            found = ", ".join(f"{a}/{b}/{c}" for a, b, c in sorted(combos))
            raise DataError(f"dataset v{version:03d} mixes several task/target/setting combinations ({found}); "
                            "offline evaluation needs the logs of one (import them into separate run dirs)")
        self.task, self.target, self.setting = next(iter(combos), ("", "", ""))
        self.train = pa.concat_tables(train_parts) if train_parts else SCHEMA.empty_table()
        self.test_rows = test_rows
        train_rows = self.train.select(cols).to_pylist()
        self.train_acc = accuracy_table(train_rows)
        self.test_acc = accuracy_table(test_rows)
        self.names = prompt_names(train_rows + test_rows)
        self.prompt_text: dict[str, str] = {}  # normalised prompt -> its first raw text (what a method writes)
        for r in train_rows + test_rows:
            self.prompt_text.setdefault(normalize_text(r["prompt"]), r["prompt"])
        overlap = set(self.train_acc) & set(self.test_acc)
        if overlap:  # split_of is a function of the normalised text: this cannot happen
            raise RuntimeError(f"{len(overlap)} queries are in both splits, e.g. {next(iter(overlap))[:80]!r}")
        # One representative raw text per normalised test query (what the policy is given), sorted.
        rep: dict[str, str] = {}
        for r in test_rows:
            rep.setdefault(normalize_text(r["query"]), r["query"])
        self.test_queries = [rep[k] for k in sorted(rep)]

        self.val_acc: AccTable = {}  # train-side queries held out of training (hold_out)
        self.val_queries: list[str] = []
        self.val_rows = 0
        self.max_train_queries: int | None = None  # the sample limit_train kept
        self.train_queries_available = len(self.train_acc)  # trainable queries before limit_train

    @property
    def trained_queries(self) -> int:
        """Unique train queries whose rows train the policy (the held-out ones excluded)."""
        return len(self.train_acc) - len(self.val_acc)

    def hold_out(self, fraction: float, seed: int) -> None:
        """Move a seeded ``fraction`` of the train queries out of the training rows, for fitting rerank's margin.
        They stay in ``train_acc``: the best single prompt is chosen over every train-side query."""
        self.val_acc = {q: v for q, v in self.train_acc.items() if split_of(q, fraction, seed + 1) == "test"}
        qs = self.train.column("query").to_pylist()
        is_val = [normalize_text(q) in self.val_acc for q in qs]
        rep: dict[str, str] = {}
        for q, v in zip(qs, is_val, strict=True):
            if v:
                rep.setdefault(normalize_text(q), q)
        self.val_queries = [rep[k] for k in sorted(rep)]
        self.train = self.train.filter(pc.invert(pa.array(is_val, type=pa.bool_())))
        self.val_rows = sum(is_val)
        self.train_queries_available = self.trained_queries

    def limit_train(self, n: int, seed: int) -> None:
        """Keep the rows of a seeded sample of ``n`` unique training queries (``task.max_train_queries``)."""
        trainable = sorted(q for q in self.train_acc if q not in self.val_acc)
        keep = set(random.Random(f"{seed}:train").sample(trainable, n))
        qs = self.train.column("query").to_pylist()
        self.train = self.train.filter(pa.array([normalize_text(q) in keep for q in qs], type=pa.bool_()))
        self.train_acc = {q: v for q, v in self.train_acc.items() if q in keep or q in self.val_acc}

    def recorded_prompts(self) -> list[str]:
        """Every recorded prompt (normalised), sorted by display name: the pool of the comparison."""
        keys = {p for table in (self.train_acc, self.test_acc) for ps in table.values() for p in ps}
        return sorted(keys, key=lambda p: (self.names.get(p, p), p))

    def summary(self, evaluated_test_queries: int) -> dict[str, Any]:
        """The split's sizes, as ``offline_eval.json`` records them."""
        return {"test_fraction": self.test_fraction, "seed": self.seed,
                "train_queries": self.trained_queries, "val_queries": len(self.val_acc), "val_rows": self.val_rows,
                "train_queries_available": self.train_queries_available, "max_train_queries": self.max_train_queries,
                "test_queries": len(self.test_acc), "train_rows": self.train.num_rows,
                "test_rows": len(self.test_rows), "query_overlap": 0, "evaluated_test_queries": evaluated_test_queries}


def split_for_training(cfg: RunConfig, store: DatasetStore, version: int, test_fraction: float, seed: int, *,
                       where: str | Path, fit_margin: bool) -> OfflineSplit:
    """Split version ``version`` of ``store`` (read from ``--data where``); hold out the validation queries
    when rerank's margin is fitted (``fit_margin``) and sample ``task.max_train_queries``. Raises DataError
    when a side is empty."""
    log.info("offline eval: reading %s v%03d (%d rows) and splitting by unique query (test fraction %.2f, "
             "seed %d)", store.root.parent, version, store.manifest(version).rows, test_fraction, seed)
    split = OfflineSplit(store, version, test_fraction, seed)
    if not split.test_queries:
        raise DataError(f"--data {where} v{version:03d}: no test queries with test fraction {test_fraction} "
                        f"and seed {seed} ({len(split.train_acc)} unique queries, all in train); was it imported "
                        "with --split train? Import with --split all, or raise --test-fraction")
    if split.train.num_rows == 0:
        raise DataError(f"--data {where} v{version:03d}: no train rows with test fraction {test_fraction} "
                        f"and seed {seed} (all {len(split.test_acc)} unique queries are in test)")
    if fit_margin:
        split.hold_out(cfg.eval.val_fraction, seed)
        log.info("offline eval: %d of the %d train queries are held out of training to fit rerank's margin "
                 "(eval.val_fraction %.2f)", len(split.val_acc), len(split.train_acc), cfg.eval.val_fraction)
    limit = split.max_train_queries = cfg.task.max_train_queries
    if limit is not None and limit < split.train_queries_available:
        split.limit_train(limit, seed)
        log.info("offline eval: task.max_train_queries = %d: training on %d of %d train queries (%d rows)",
                 limit, split.trained_queries, split.train_queries_available, split.train.num_rows)
    return split


__all__ = ["OfflineSplit", "data_fingerprint", "resolve_data", "split_for_training"]
