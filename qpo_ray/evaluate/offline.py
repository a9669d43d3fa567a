"""Offline evaluation of a QPO policy on recorded logs (``qpo-ray eval --target replay``).

No target LLM is called: the logs (e.g. the Prompt-OIRL MAWPS/SVAMP correctness logs, imported with
``qpo-ray data import --format oirl --split all``) are both the training data and the judge.

1. **Split.** The rows of one dataset version are split by unique query text with the importer's
   :func:`~qpo_ray.data.importers.split_of` (a seeded hash of the normalised text), so repeats of a question
   never sit on both sides.
2. **Train.** The train rows (in a seeded random order: imports are grouped by prompt, and the trainer only
   shuffles locally) become dataset v000 of a new run directory ``out_dir``; the policy is trained there
   with Ray Train + DeepSpeed (:func:`~qpo_ray.train.train_policy`, schedule ``scratch``). A rerun with the
   same ``out_dir`` reuses the finished policy, or resumes an interrupted training from its checkpoint.
3. **Generate.** One greedy prompt per unique test query, conditioned on ``r = eval.target_reward``.
4. **Replay.** Each ``(test query, generated prompt)`` is answered by a
   :class:`~qpo_ray.score.replay.ReplayTable` of the TEST rows (exact / approximate / no match, repeats
   averaged). An unmatched generation counts as incorrect; the match counts are reported.
5. **Baselines** on the same test queries. The accuracy of a prompt on a query is the mean correctness over
   that query's recorded repeats; a prompt's accuracy is the mean of that over the queries it was
   recorded on (its *coverage*):

   - every recorded prompt on its own (accuracy over the test queries it covers, and its coverage);
   - the **best single prompt chosen on train**: among the prompts recorded on at least
     :data:`MIN_TRAIN_COVERAGE` (90 %) of the train queries, the one with the highest mean train accuracy
     (ties: higher coverage, then the text), measured on test;
   - a random recorded prompt (expected accuracy: per query, the mean over its recorded prompts);
   - the per-query oracle: per test query the best recorded prompt (an upper bound for any policy that
     picks among the recorded prompts).

Results go to ``out_dir/offline_eval.json`` and ``out_dir/offline_report.md``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from qpo_ray.config import RunConfig, dump_config
from qpo_ray.data.schema import SCHEMA, normalize_text, split_of
from qpo_ray.data.store import DatasetStore, parse_version_path
from qpo_ray.errors import ConfigError, DataError
from qpo_ray.evaluate.baselines import test_queries
from qpo_ray.runs import atomic_write_bytes, atomic_write_json
from qpo_ray.score.replay import KINDS, MIN_SIMILARITY, ReplayTable

log = logging.getLogger("qpo_ray")

MIN_TRAIN_COVERAGE = 0.9
EVAL_JSON = "offline_eval.json"
REPORT_MD = "offline_report.md"
META_JSON = "offline_meta.json"  # which data and split the run directory was built from
TRAINING_JSON = "offline_training.json"  # written once the policy is trained (wall time, metrics)
POLICY_SUBDIR = "policy"
RUN_NAME = "qpo-offline"
COMMIT_CHUNK = 50_000
HEARTBEAT_S = 60.0

# Accuracy table: normalised query -> normalised prompt -> mean correctness over the recorded rows.
AccTable = dict[str, dict[str, float]]


# -- pure helpers (no Ray, no model) --------------------------------------------------------------------
def accuracy_table(rows: Iterable[Mapping[str, Any]]) -> AccTable:
    """Per (normalised query, normalised prompt): the mean of ``correct`` over its recorded rows (repeats).

    Rows without a ``correct`` value are an error: offline accuracy needs correctness logs."""
    sums: dict[str, dict[str, list[float]]] = defaultdict(dict)
    for i, r in enumerate(rows):
        c = r.get("correct")
        if c is None or (isinstance(c, float) and math.isnan(c)):
            raise DataError(f"row {i} (query {str(r.get('query'))[:60]!r}): no 'correct' value; offline "
                            "evaluation needs correctness logs (import them with a correct column or --format oirl)")
        s = sums[normalize_text(r["query"])].setdefault(normalize_text(r["prompt"]), [0.0, 0])
        s[0] += float(c)
        s[1] += 1
    return {q: {p: s / n for p, (s, n) in ps.items()} for q, ps in sums.items()}


def prompt_names(rows: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """A short display name per normalised prompt: its ``offline:<alias>`` source alias when the rows agree
    on one, else the first 40 characters of its text."""
    seen: dict[str, Counter] = defaultdict(Counter)
    texts: dict[str, str] = {}
    for r in rows:
        p = normalize_text(r["prompt"])
        texts.setdefault(p, r["prompt"])
        seen[p][str(r.get("source") or "")] += 1
    out = {}
    for p, srcs in seen.items():
        src, _ = srcs.most_common(1)[0]
        if len(srcs) == 1 and src.startswith("offline:") and src != "offline:import":
            out[p] = src.split(":", 1)[1]
        else:
            t = " ".join(texts[p].split())
            out[p] = (t[:40] + "…") if len(t) > 40 else (t or "<empty>")
    return out


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def baselines(train: AccTable, test: AccTable, *, min_train_coverage: float = MIN_TRAIN_COVERAGE,
              names: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The recorded-prompt baselines on the test queries (see the module doc).

    Returns ``per_prompt`` (every prompt: train/test accuracy, coverage and query counts, best train
    accuracy first), ``best_single_on_train``, ``random_recorded`` and ``oracle``. ``accuracy`` of the best
    single prompt is over the test queries it covers; ``accuracy_all`` counts uncovered ones as incorrect."""
    if not test:
        raise DataError("no test queries to evaluate on")
    names = names or {}
    n_train, n_test = len(train), len(test)
    prompts = sorted({p for table in (train, test) for ps in table.values() for p in ps})
    per_prompt = []
    for p in prompts:
        tr = [ps[p] for ps in train.values() if p in ps]
        te = [ps[p] for ps in test.values() if p in ps]
        per_prompt.append({
            "name": names.get(p, p[:40]), "prompt": p,
            "train_accuracy": _mean(tr), "train_queries": len(tr),
            "train_coverage": len(tr) / n_train if n_train else 0.0,
            "test_accuracy": _mean(te), "test_queries": len(te), "test_coverage": len(te) / n_test,
        })
    per_prompt.sort(key=lambda x: (-(x["train_accuracy"] if x["train_accuracy"] is not None else -1.0),
                                   -x["train_coverage"], x["prompt"]))
    eligible = [x for x in per_prompt if x["train_queries"] and x["train_coverage"] >= min_train_coverage]
    best = None
    if eligible:
        b = eligible[0]  # per_prompt is sorted by (train accuracy, coverage, text)
        covered = [ps[b["prompt"]] for ps in test.values() if b["prompt"] in ps]
        best = {"name": b["name"], "prompt": b["prompt"], "train_accuracy": b["train_accuracy"],
                "train_coverage": b["train_coverage"], "accuracy": _mean(covered),
                "accuracy_all": sum(covered) / n_test, "coverage": len(covered) / n_test, "n": len(covered)}
    return {
        "per_prompt": per_prompt,
        "min_train_coverage": min_train_coverage,
        "best_single_on_train": best,
        "random_recorded": {"accuracy": sum(sum(ps.values()) / len(ps) for ps in test.values()) / n_test,
                            "coverage": 1.0, "n": n_test},
        "oracle": {"accuracy": sum(max(ps.values()) for ps in test.values()) / n_test, "coverage": 1.0,
                   "n": n_test},
    }


def replay_generated(table: ReplayTable, queries: Sequence[str], prompts: Sequence[str],
                     names: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Score one generated prompt per test query by replay; unmatched generations count as incorrect.

    Returns ``accuracy`` (over all queries), ``matched_accuracy`` (over matched ones only), ``matches``
    (exact/approx/none counts), ``chosen`` (queries per matched recorded prompt, ``(unmatched)`` for none)
    and ``per_query`` (query, prompt, kind, matched prompt, similarity, correct)."""
    if len(queries) != len(prompts):
        raise ValueError(f"{len(queries)} queries but {len(prompts)} prompts")
    names = names or {}
    table.reset_counts()
    per_query, chosen = [], Counter()
    for q, p in zip(queries, prompts, strict=True):
        r = table.lookup(q, p)
        correct = r.correct if r.kind != "none" and r.correct is not None else 0.0
        per_query.append({"query": q, "prompt": p, "kind": r.kind, "matched": r.matched_prompt,
                          "similarity": round(r.similarity, 4), "correct": correct})
        chosen[names.get(r.matched_prompt, r.matched_prompt) if r.matched_prompt else "(unmatched)"] += 1
    counts = table.report()
    matched = [x["correct"] for x in per_query if x["kind"] != "none"]
    n = len(per_query)
    return {"accuracy": sum(x["correct"] for x in per_query) / n if n else float("nan"),
            "matched_accuracy": _mean(matched), "n": n, "coverage": len(matched) / n if n else 0.0,
            "matches": {k: counts[k] for k in KINDS}, "chosen": dict(chosen.most_common()),
            "distinct_prompts": len({normalize_text(p) for p in prompts}), "per_query": per_query}


# -- the data side -----------------------------------------------------------------------------------------
def _resolve_data(data_run_dir: str | Path, version: int | None) -> tuple[DatasetStore, int, Path]:
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


def _data_fingerprint(store: DatasetStore, version: int) -> str:
    m = store.manifest(version)
    return hashlib.sha256("".join(f.sha256 for f in m.files).encode()).hexdigest()[:16]


def _config_fingerprint(cfg: RunConfig) -> str:
    d = {"policy": cfg.policy.model_dump(mode="json"), "train": cfg.train.model_dump(mode="json")}
    d["train"].pop("storage_path", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


class OfflineSplit:
    """The rows of a version split by unique query text, as arrow tables plus the per-query accuracy."""

    def __init__(self, store: DatasetStore, version: int, test_fraction: float, seed: int):
        side: dict[str, str] = {}  # raw query text -> split (split_of is per normalised text)
        train_parts: list[pa.Table] = []
        test_rows: list[dict[str, Any]] = []
        combos: Counter = Counter()
        self.rows = 0
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
        overlap = set(self.train_acc) & set(self.test_acc)
        if overlap:  # split_of is a function of the normalised text: this cannot happen
            raise RuntimeError(f"{len(overlap)} queries are in both splits, e.g. {next(iter(overlap))[:80]!r}")
        # One representative raw text per normalised test query (what the policy is given), sorted.
        rep: dict[str, str] = {}
        for r in test_rows:
            rep.setdefault(normalize_text(r["query"]), r["query"])
        self.test_queries = [rep[k] for k in sorted(rep)]

    def limit_train(self, n: int, seed: int) -> None:
        """Keep the rows of a seeded sample of ``n`` unique train queries (``task.max_train_queries``)."""
        keep = set(random.Random(f"{seed}:train").sample(sorted(self.train_acc), n))
        qs = self.train.column("query").to_pylist()
        self.train = self.train.filter(pa.array([normalize_text(q) in keep for q in qs]))
        self.train_acc = {q: v for q, v in self.train_acc.items() if q in keep}


def _commit_train(store: DatasetStore, train: pa.Table, seed: int, source: str,
                  reward_range: tuple[float, float]) -> int:
    """Commit the train rows as v000 of the evaluation's run directory, in a seeded random order, with the
    source version's reward range (so rewards normalise as they would in the source run)."""
    perm = np.random.default_rng(seed).permutation(train.num_rows)
    shuffled = train.take(pa.array(perm))
    chunks = (shuffled.slice(i, COMMIT_CHUNK) for i in range(0, shuffled.num_rows, COMMIT_CHUNK))
    m = store.commit(chunks, version=0, reward_range=reward_range, source=source,
                     note=f"offline-eval train split of {source}")
    return m.version


# -- the driver --------------------------------------------------------------------------------------------
def _prepare_out(out_dir: Path, data_dir: Path, meta: dict[str, Any]) -> DatasetStore:
    """Check that ``out_dir`` is new or was built from the same data, split and config."""
    if out_dir == data_dir:
        raise ConfigError(f"--out {out_dir}: must differ from the --data run directory")
    store = DatasetStore(out_dir)
    store.clean_tmp()
    meta_path = out_dir / META_JSON
    if meta_path.is_file():
        old = json.loads(meta_path.read_text(encoding="utf-8"))
        for key, what in (("data_fingerprint", "dataset"), ("test_fraction", "test fraction"), ("seed", "seed"),
                          ("max_train_queries", "task.max_train_queries"),
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


@contextmanager
def _heartbeat(what: str, t0: float, every_s: float = HEARTBEAT_S) -> Iterator[None]:
    """Log ``what`` is still running every ``every_s`` seconds until the block ends."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(every_s):
            log.info("offline eval: %s still running (%.0f s)", what, time.perf_counter() - t0)

    th = threading.Thread(target=beat, name=f"qpo-heartbeat-{what}", daemon=True)
    th.start()
    try:
        yield
    finally:
        stop.set()
        th.join()


def _train(cfg: RunConfig, store: DatasetStore, out_dir: Path) -> dict[str, Any]:
    """Train (or reuse / resume) the policy of ``out_dir``; returns what offline_training.json holds."""
    done = out_dir / TRAINING_JSON
    policy_dir = out_dir / POLICY_SUBDIR
    if done.is_file() and (policy_dir / "policy_config.json").is_file():
        info = json.loads(done.read_text(encoding="utf-8"))
        log.info("offline eval: reusing the trained policy %s (trained in %.1f s)", policy_dir, info["wall_s"])
        return {**info, "reused": True}
    from qpo_ray.driver.session import init_ray
    from qpo_ray.train import train_policy
    from qpo_ray.train.trainer import grad_accum_steps

    tcfg = cfg.train
    rows = store.manifest(0).rows
    if rows // tcfg.num_workers // tcfg.micro_batch_size // grad_accum_steps(tcfg, tcfg.num_workers) < 1:
        raise DataError(f"the train split has {rows} rows: too few for one optimizer step of "
                        f"train.batch_size={tcfg.batch_size} on {tcfg.num_workers} worker(s)")
    init_ray()
    log.info("offline eval: training the policy on %d train rows (%d epochs; progress per epoch below)",
             rows, tcfg.scratch.epochs)
    t0 = time.perf_counter()
    with _heartbeat("training", t0):  # the trainer logs once per epoch; say it is alive in between
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


def _generate(policy_dir: Path, queries: Sequence[str], target_reward: float, batch_size: int) -> list[str]:
    from qpo_ray.policy.generate import generate_prompts
    from qpo_ray.policy.model import QPOPolicy

    policy = QPOPolicy.load(policy_dir)
    out: list[str] = []
    step = batch_size * 4
    t0 = time.perf_counter()
    for i in range(0, len(queries), step):
        out += generate_prompts(policy, queries[i:i + step], target_reward=target_reward, greedy=True,
                                batch_size=batch_size)
        log.info("offline eval: generated %d/%d prompts (%.0f s)", len(out), len(queries), time.perf_counter() - t0)
    return out


def evaluate_offline(cfg: RunConfig, data_run_dir: str | Path, out_dir: str | Path, *, version: int | None = None,
                     test_fraction: float = 0.2, seed: int = 0, min_train_coverage: float = MIN_TRAIN_COVERAGE,
                     min_similarity: float = MIN_SIMILARITY, gen_batch_size: int = 64,
                     examples: int = 10) -> dict[str, Any]:
    """Split the logs of ``data_run_dir`` (dataset ``version``, default the latest) by unique query, train a
    policy on the train rows in ``out_dir``, generate one greedy prompt per test query and replay it
    against the recorded test rows; compare with the recorded-prompt baselines (module doc).

    ``cfg.eval.max_test_queries`` (if set) evaluates a seeded sample of the test queries; every method is
    measured on the same ones. Writes ``offline_eval.json`` and ``offline_report.md`` into ``out_dir`` and
    returns the JSON's content (without the per-query rows, which the JSON holds)."""
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"--test-fraction {test_fraction}: must be strictly between 0 and 1")
    if not 0.0 <= min_train_coverage <= 1.0:
        raise ConfigError(f"min_train_coverage {min_train_coverage}: must be within [0, 1]")
    t_start = time.perf_counter()
    data_store, version, data_dir = _resolve_data(data_run_dir, version)
    out = Path(out_dir).resolve()
    n_rows = data_store.manifest(version).rows
    log.info("offline eval: reading %s v%03d (%d rows) and splitting by unique query (test fraction %.2f, "
             "seed %d)", data_dir, version, n_rows, test_fraction, seed)
    split = OfflineSplit(data_store, version, test_fraction, seed)
    if not split.test_queries:
        raise DataError(f"--data {data_run_dir} v{version:03d}: no test queries with test fraction {test_fraction} "
                        f"and seed {seed} ({len(split.train_acc)} unique queries, all in train); was it imported "
                        "with --split train? Import with --split all, or raise --test-fraction")
    if split.train.num_rows == 0:
        raise DataError(f"--data {data_run_dir} v{version:03d}: no train rows with test fraction {test_fraction} "
                        f"and seed {seed} (all {len(split.test_acc)} unique queries are in test)")
    limit = cfg.task.max_train_queries
    train_queries_all = len(split.train_acc)
    if limit is not None and limit < train_queries_all:
        split.limit_train(limit, seed)
        log.info("offline eval: task.max_train_queries = %d: training on %d of %d train queries (%d rows)",
                 limit, len(split.train_acc), train_queries_all, split.train.num_rows)
    cfg = cfg.model_copy(update={"run_dir": str(out)})
    meta = {"data_run_dir": str(data_dir), "version": version, "data_fingerprint": _data_fingerprint(data_store, version),
            "test_fraction": test_fraction, "seed": seed, "max_train_queries": limit,
            "config_fingerprint": _config_fingerprint(cfg)}
    store = _prepare_out(out, data_dir, meta)
    dump_config(cfg, out / "config.yaml")
    if store.latest() is None:
        log.info("offline eval: committing %d train rows (%d unique queries) to %s", split.train.num_rows,
                 len(split.train_acc), store.root)
        dm = data_store.manifest(version)
        _commit_train(store, split.train, seed, f"{data_dir} v{version:03d}", (dm.reward_min, dm.reward_max))
    training = _train(cfg, store, out)

    queries = split.test_queries
    if cfg.eval.max_test_queries is not None and cfg.eval.max_test_queries < len(queries):
        queries = sorted(test_queries(queries, cfg.eval.max_test_queries, seed))
    test_acc = {normalize_text(q): split.test_acc[normalize_text(q)] for q in queries}
    log.info("offline eval: generating one greedy prompt per test query (%d, r = %g)", len(queries),
             cfg.eval.target_reward)
    t0 = time.perf_counter()
    prompts = _generate(out / POLICY_SUBDIR, queries, cfg.eval.target_reward, gen_batch_size)
    gen_s = time.perf_counter() - t0

    table = ReplayTable.from_rows(split.test_rows, min_similarity=min_similarity, where=f"{data_dir} test rows")
    qpo = replay_generated(table, queries, prompts, split.names)
    base = baselines(split.train_acc, test_acc, min_train_coverage=min_train_coverage, names=split.names)
    n_test_rows = len(split.test_rows)
    result = {
        "data": {"run_dir": str(data_dir), "version": version, "rows": split.rows, "task": split.task,
                 "target": split.target, "setting": split.setting},
        "split": {"test_fraction": test_fraction, "seed": seed, "train_queries": len(split.train_acc),
                  "train_queries_available": train_queries_all, "max_train_queries": limit,
                  "test_queries": len(split.test_acc), "train_rows": split.train.num_rows,
                  "test_rows": n_test_rows, "query_overlap": 0, "evaluated_test_queries": len(queries)},
        "policy": {"model": cfg.policy.model, "tokenizer": cfg.policy.tokenizer,
                   "keep_layers": cfg.policy.keep_layers, "max_query_tokens": cfg.policy.max_query_tokens,
                   "max_prompt_tokens": cfg.policy.max_prompt_tokens, "target_reward": cfg.eval.target_reward,
                   "policy_dir": str(out / POLICY_SUBDIR)},
        "training": training,
        "generation": {"wall_s": round(gen_s, 2), "greedy": True, "queries": len(queries),
                       "distinct_prompts": qpo["distinct_prompts"]},
        "replay": {"min_similarity": min_similarity, "matches": qpo["matches"],
                   "unmatched_count_as_incorrect": True},
        "methods": {
            "qpo": {"accuracy": qpo["accuracy"], "matched_accuracy": qpo["matched_accuracy"],
                    "coverage": qpo["coverage"], "n": qpo["n"], "chosen": qpo["chosen"]},
            "best_single_on_train": base["best_single_on_train"],
            "random_recorded": base["random_recorded"],
            "oracle": base["oracle"],
        },
        "min_train_coverage": min_train_coverage,
        "per_prompt": base["per_prompt"],
        "examples": qpo["per_query"][:examples],
        "wall_s": round(time.perf_counter() - t_start, 2),
    }
    atomic_write_json(out / EVAL_JSON, {**result, "per_query": qpo["per_query"]})
    atomic_write_bytes(out / REPORT_MD, render_report(result).encode("utf-8"))
    log.info("offline eval: wrote %s and %s", out / EVAL_JSON, out / REPORT_MD)
    return result


# -- reporting ---------------------------------------------------------------------------------------------
def _f(x: Any) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.3f}" if isinstance(x, float) else str(x)


def summary_table(result: Mapping[str, Any]) -> str:
    """The headline table (markdown): test accuracy of QPO and the baselines."""
    m = result["methods"]
    best = m["best_single_on_train"]
    matches = result["replay"]["matches"]
    lines = ["| method | test accuracy | test coverage | note |", "|---|---|---|---|",
             f"| QPO policy (greedy, r = {result['policy']['target_reward']:g}) | {_f(m['qpo']['accuracy'])} | "
             f"{_f(m['qpo']['coverage'])} | replay exact {matches['exact']} / approx {matches['approx']} / "
             f"none {matches['none']} (none = incorrect); accuracy on matched {_f(m['qpo']['matched_accuracy'])} |"]
    if best is not None:
        lines.append(f"| best single prompt on train (`{best['name']}`) | {_f(best['accuracy'])} | "
                     f"{_f(best['coverage'])} | train accuracy {_f(best['train_accuracy'])}, train coverage "
                     f"{_f(best['train_coverage'])} |")
    else:
        lines.append(f"| best single prompt on train | – | – | no prompt covers ≥ "
                     f"{result['min_train_coverage']:.0%} of the train queries |")
    lines.append(f"| random recorded prompt (expected) | {_f(m['random_recorded']['accuracy'])} | 1.000 | |")
    lines.append(f"| per-query oracle (best recorded prompt) | {_f(m['oracle']['accuracy'])} | 1.000 | upper bound |")
    return "\n".join(lines)


def render_report(result: Mapping[str, Any]) -> str:
    d, s, tr, g = result["data"], result["split"], result["training"], result["generation"]
    pol = result["policy"]
    lines = [
        f"# Offline evaluation (replay) — {d['task']} / {d['target']} ({d['setting']})", "",
        f"- **data**: `{d['run_dir']}` v{d['version']:03d}, {d['rows']} rows",
        f"- **split** by unique query text (seed {s['seed']}, test fraction {s['test_fraction']}): "
        f"train {s['train_queries']} queries / {s['train_rows']} rows"
        + (f" (a seeded sample of the {s['train_queries_available']} train queries: task.max_train_queries)"
           if s['train_queries'] < s['train_queries_available'] else "")
        + f", test {s['test_queries']} queries / "
        f"{s['test_rows']} rows, 0 queries in both; evaluated on {s['evaluated_test_queries']} test queries",
        f"- **policy**: `{pol['model']}` (tokenizer `{pol['tokenizer']}`, keep_layers {pol['keep_layers']}, "
        f"{pol['max_query_tokens']} query / {pol['max_prompt_tokens']} prompt tokens)",
        f"- **training**: {tr['wall_s']:.1f} s wall, {tr['epochs']} epoch(s) on {tr['train_rows']} rows"
        + (" (reused from an earlier run)" if tr.get("reused") else "")
        + (f", resumed from epoch {tr['resumed_from_epoch']}" if tr.get("resumed_from_epoch") else "")
        + f"; final loss {_f(tr['final_metrics'].get('loss'))}",
        f"- **generation**: {g['queries']} greedy prompts in {g['wall_s']:.1f} s; {g['distinct_prompts']} distinct",
        "", "## Test accuracy", "", summary_table(result), "",
        "Accuracy of a prompt on a query = mean correctness over that query's recorded repeats. The QPO prompt "
        "of a test query is replayed against the prompts recorded for THAT query: an exact match (normalised "
        "text), else the most similar one with token-set Jaccard ≥ "
        f"{result['replay']['min_similarity']} (approx); below that it is unmatched and counts as incorrect. "
        f"The best single prompt is chosen on the TRAIN queries: the highest mean train accuracy among the "
        f"prompts recorded on ≥ {result['min_train_coverage']:.0%} of them; its test accuracy is over the test "
        "queries it covers. The oracle takes the best recorded prompt per test query.", "",
        "## Prompts the policy chose (matched recorded prompt → test queries)", "",
        "| matched prompt | queries |", "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in result["methods"]["qpo"]["chosen"].items()]
    lines += ["", "## Every recorded prompt", "",
              "| prompt | train accuracy | train coverage | test accuracy | test coverage |", "|---|---|---|---|---|"]
    lines += [f"| {x['name']} | {_f(x['train_accuracy'])} | {_f(x['train_coverage'])} | {_f(x['test_accuracy'])} | "
              f"{_f(x['test_coverage'])} |" for x in result["per_prompt"]]
    if result.get("examples"):
        lines += ["", "## Examples", ""]
        for ex in result["examples"]:
            lines.append(f"- `{ex['query'][:90]}` → `{ex['prompt'][:100]}` ({ex['kind']}, correct {_f(ex['correct'])})")
    lines.append("")
    return "\n".join(lines)


__all__ = ["MIN_TRAIN_COVERAGE", "OfflineSplit", "accuracy_table", "baselines", "evaluate_offline", "prompt_names",
           "render_report", "replay_generated", "summary_table"]
