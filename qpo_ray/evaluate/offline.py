"""Replay evaluation of a QPO policy on recorded logs (``qpo-ray eval --target replay``).

No target LLM is called: the logs (e.g. the Prompt-OIRL MAWPS/SVAMP correctness logs, imported with
``qpo-ray data import --format oirl --split all``) are both the training data and the judge.

1. **Split.** The rows of one dataset version are split by unique query text (``split_of``: a seeded hash of
   the normalised text), so repeats of a question never sit on both sides.
2. **Train.** The train rows (in a seeded random order: imports are grouped by prompt, and the trainer only
   shuffles locally) become dataset v000 of a new run directory ``out_dir``; the policy is trained there
   with Ray Train + DeepSpeed (``train_policy``, schedule ``scratch``). A rerun with the same ``out_dir``
   reuses the finished policy, or resumes an interrupted training from its checkpoint.
   With ``eval.rerank_margin: fit``, ``eval.val_fraction`` of the train queries (another seeded hash) are held
   out of training: rerank's margin is fitted on them after training (``qpo_ray.evaluate.margin``).
3. **Prompts.** The QPO methods (``qpo_ray.evaluate.policy_prompts``) write one prompt per test query; rerank
   ranks the prompts recorded for that query, keeping the best single prompt on train unless r̂ beats it by
   more than the margin; best-of-N samples with the config's ``seed``.
4. **Judge.** A pool prompt's correctness on a test query is its mean recorded correctness there (``None``
   when it was not recorded on that query). A QPO prompt is answered by a ``ReplayTable`` of the TEST rows
   (exact match, else the most similar recorded prompt of that query; below the similarity bar it is
   unmatched and counts as incorrect). The comparison is ``qpo_ray.evaluate.compare``, the same as live.

Results go to ``out_dir/offline_eval.json`` (every query's prompts and correctness) and
``out_dir/offline_report.md``; ``out_dir/policy/inference.json`` records the headline method (``eval.method``)
with its settings, the recorded prompts, the best single prompt on train and the margin, so
``qpo-ray serve --policy out_dir/policy`` serves the prompts measured here (``qpo_ray.policy.served``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from qpo_ray.atomic import atomic_write_bytes, atomic_write_json
from qpo_ray.config import RunConfig, dump_config
from qpo_ray.data.schema import SCHEMA, normalize_text, split_of
from qpo_ray.data.store import DatasetStore, parse_version_path
from qpo_ray.errors import ConfigError, DataError
from qpo_ray.evaluate.baselines import test_queries
from qpo_ray.evaluate.compare import (
    MIN_TRAIN_COVERAGE,
    AccTable,
    EvalQuery,
    accuracy_table,
    best_single_on_train,
    compare,
    prompt_names,
)
from qpo_ray.evaluate.margin import fit_margin
from qpo_ray.evaluate.policy_prompts import METHOD_OF, default_prompt_source, qpo_prompts
from qpo_ray.evaluate.report import render_eval
from qpo_ray.policy.inference import InferenceSettings
from qpo_ray.policy.served import write_inference
from qpo_ray.score.replay import MIN_SIMILARITY, ReplayTable

log = logging.getLogger("qpo_ray")

EVAL_JSON = "offline_eval.json"
REPORT_MD = "offline_report.md"
META_JSON = "offline_meta.json"  # which data and split the run directory was built from
TRAINING_JSON = "offline_training.json"  # written once the policy is trained (wall time, metrics)
POLICY_SUBDIR = "policy"
RUN_NAME = "qpo-offline"
COMMIT_CHUNK = 50_000

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

    @property
    def trained_queries(self) -> int:
        """Unique train queries whose rows train the policy (the held-out ones excluded)."""
        return len(self.train_acc) - len(self.val_acc)

    def hold_out(self, fraction: float, seed: int) -> None:
        """Move a seeded ``fraction`` of the train queries out of the training rows, for fitting rerank's margin.
        They stay in ``train_acc``: the best single prompt on train is chosen over every train-side query."""
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

    def limit_train(self, n: int, seed: int) -> None:
        """Keep the rows of a seeded sample of ``n`` unique training queries (``task.max_train_queries``)."""
        trainable = sorted(q for q in self.train_acc if q not in self.val_acc)
        keep = set(random.Random(f"{seed}:train").sample(trainable, n))
        qs = self.train.column("query").to_pylist()
        self.train = self.train.filter(pa.array([normalize_text(q) in keep for q in qs], type=pa.bool_()))
        self.train_acc = {q: v for q, v in self.train_acc.items() if q in keep or q in self.val_acc}


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


def _train(cfg: RunConfig, store: DatasetStore, out_dir: Path) -> dict[str, Any]:
    """Train (or reuse / resume) the policy of ``out_dir``; returns what offline_training.json holds."""
    done = out_dir / TRAINING_JSON
    policy_dir = out_dir / POLICY_SUBDIR
    if done.is_file() and (policy_dir / "policy_config.json").is_file():
        info = json.loads(done.read_text(encoding="utf-8"))
        log.info("offline eval: reusing the trained policy %s (trained in %.1f s)", policy_dir, info["wall_s"])
        return {**info, "reused": True}
    from qpo_ray.ray_init import init_ray
    from qpo_ray.train import train_policy
    from qpo_ray.train.worker import grad_accum_steps

    tcfg = cfg.train
    rows = store.manifest(0).rows
    if rows // tcfg.num_workers // tcfg.micro_batch_size // grad_accum_steps(tcfg, tcfg.num_workers) < 1:
        raise DataError(f"the train split has {rows} rows: too few for one optimizer step of "
                        f"train.batch_size={tcfg.batch_size} on {tcfg.num_workers} worker(s)")
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


def _fit_margin(policy_dir: Path, split: OfflineSplit, default: str | None) -> dict[str, Any]:
    """Rerank's margin fitted on the held-out validation queries (``qpo_ray.evaluate.margin``)."""
    from qpo_ray.policy.generate import candidate_scores
    from qpo_ray.policy.model import QPOPolicy

    norm = [normalize_text(q) for q in split.val_queries]
    keys = [sorted(split.val_acc[q]) for q in norm]
    scores = candidate_scores(QPOPolicy.load(policy_dir), split.val_queries,
                              [[split.prompt_text[k] for k in ks] for ks in keys])
    correct = [[split.val_acc[q][k] for k in ks] for q, ks in zip(norm, keys, strict=True)]
    dkey = normalize_text(default) if default is not None else None
    fitted = fit_margin(scores, correct, [ks.index(dkey) if dkey in ks else None for ks in keys])
    if fitted["val_queries"]:
        log.info("offline eval: rerank's margin %.3f: it leaves the best single prompt on %.0f%% of %d validation "
                 "queries, %+.2f pts there", fitted["margin"], 100 * fitted["switch_share"], fitted["val_queries"],
                 fitted["val_gain_pts"])
    else:
        log.warning("offline eval: no validation query has the best single prompt recorded; rerank's margin is 0")
    return {**fitted, "fitted": True}


def _record_inference(out: Path, cfg: RunConfig, settings: InferenceSettings, split: OfflineSplit,
                      best: dict[str, Any] | None, margin: Mapping[str, Any]) -> None:
    """``OUT/policy/inference.json``: how the policy was evaluated here, so serving it gives these prompts."""
    what = "replay evaluation"
    if margin["fitted"] and margin["val_queries"]:
        m = (f"fitted by the {what} on {margin['val_queries']} train queries held out of training "
             f"(eval.val_fraction {cfg.eval.val_fraction:g})")
    elif margin["fitted"]:
        m = f"0: the {what} had no held-out train query with the best single prompt recorded"
    else:
        m = f"eval.rerank_margin of the {what}"
    write_inference(out / POLICY_SUBDIR, cfg, settings, evaluation=what, run_config=out / "config.yaml",
                    task=split.task or None, setting=split.setting or None,
                    sources={"task": f"the task of the logs ({what})", "setting": f"the setting of the logs ({what})",
                             "candidates": f"every prompt recorded in the logs, {len(settings.candidates)} ({what}; "
                                           "there rerank ranked the ones recorded for each test query)",
                             "default_prompt": default_prompt_source(best, what), "margin": m})


def evaluate_offline(cfg: RunConfig, data_run_dir: str | Path, out_dir: str | Path, *, version: int | None = None,
                     test_fraction: float = 0.2, min_train_coverage: float = MIN_TRAIN_COVERAGE,
                     min_similarity: float = MIN_SIMILARITY) -> dict[str, Any]:
    """Split the logs of ``data_run_dir`` (dataset ``version``, default the latest that added rows) by unique
    query, train a policy on the train rows in ``out_dir``, let every QPO method write a prompt per test query,
    and compare with the recorded-prompt baselines by replay (module doc).

    ``cfg.eval.max_test_queries`` (if set) evaluates a seeded sample of the test queries; every method is
    measured on the same ones. Writes ``offline_eval.json`` and ``offline_report.md`` into ``out_dir`` and
    returns the JSON's content. The config's ``seed`` seeds the split and everything after it."""
    seed = cfg.seed
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
    fit = cfg.eval.rerank_margin == "fit" and cfg.policy.reward_head == "last_prompt"
    if fit:
        split.hold_out(cfg.eval.val_fraction, seed)
        log.info("offline eval: %d of the %d train queries are held out of training to fit rerank's margin "
                 "(eval.val_fraction %.2f)", len(split.val_acc), len(split.train_acc), cfg.eval.val_fraction)
    limit = cfg.task.max_train_queries
    train_queries_all = split.trained_queries
    if limit is not None and limit < train_queries_all:
        split.limit_train(limit, seed)
        log.info("offline eval: task.max_train_queries = %d: training on %d of %d train queries (%d rows)",
                 limit, len(split.train_acc), train_queries_all, split.train.num_rows)
    cfg = cfg.model_copy(update={"run_dir": str(out)})
    meta = {"data_run_dir": str(data_dir), "version": version, "data_fingerprint": _data_fingerprint(data_store, version),
            "test_fraction": test_fraction, "seed": seed, "max_train_queries": limit,
            "val_fraction": cfg.eval.val_fraction if fit else None, "config_fingerprint": _config_fingerprint(cfg)}
    store = _prepare_out(out, data_dir, meta)
    dump_config(cfg, out / "config.yaml")
    if store.latest() is None:
        log.info("offline eval: committing %d train rows (%d unique queries) to %s", split.train.num_rows,
                 split.trained_queries, store.root)
        dm = data_store.manifest(version)
        _commit_train(store, split.train, seed, f"{data_dir} v{version:03d}", (dm.reward_min, dm.reward_max))
    training = _train(cfg, store, out)

    queries = split.test_queries
    if cfg.eval.max_test_queries is not None and cfg.eval.max_test_queries < len(queries):
        queries = sorted(test_queries(queries, cfg.eval.max_test_queries, seed))
    tq = [EvalQuery(q) for q in queries]
    norm_q = [normalize_text(q) for q in queries]
    pool_keys = sorted({p for table in (split.train_acc, split.test_acc) for ps in table.values() for p in ps},
                       key=lambda p: (split.names.get(p, p), p))
    pool = [split.prompt_text[p] for p in pool_keys]
    table = [{text: split.test_acc[q].get(key) for key, text in zip(pool_keys, pool, strict=True)} for q in norm_q]
    replay = ReplayTable.from_rows(split.test_rows, min_similarity=min_similarity, where=f"{data_dir} test rows")

    def judge(pairs: Sequence[tuple[str, str]]) -> list[tuple[float | None, dict[str, Any]]]:
        out_: list[tuple[float | None, dict[str, Any]]] = []
        for q, p in pairs:
            r = replay.lookup(q, p)
            out_.append((r.correct if r.kind != "none" else None,
                         {"match": r.kind, "matched": r.matched_prompt, "similarity": round(r.similarity, 4)}))
        return out_

    log.info("offline eval: the policy writes prompts for %d test queries (r = %g; methods: greedy%s%s)",
             len(queries), cfg.eval.target_reward, f", best-of-{cfg.eval.best_of_n}" if cfg.eval.best_of_n > 1 else "",
             ", rerank" if cfg.policy.reward_head == "last_prompt" else "")
    recorded = [[split.prompt_text[p] for p in sorted(split.test_acc[q], key=pool_keys.index)] for q in norm_q]
    best = best_single_on_train(split.train_acc, pool, min_train_coverage)
    best_prompt = best["prompt"] if best else None
    # "fit" without the last_prompt head: there is no rerank, so no margin to fit.
    margin = (_fit_margin(out / POLICY_SUBDIR, split, best_prompt) if fit
              else {"margin": 0.0 if cfg.eval.rerank_margin == "fit" else float(cfg.eval.rerank_margin),
                    "fitted": False})
    settings = InferenceSettings.from_config(cfg, candidates=pool, default_prompt=best_prompt,
                                             margin=margin["margin"])
    qpo, took = qpo_prompts(out / POLICY_SUBDIR, queries, settings, candidates=recorded)
    result = compare(tq, pool, table, judge, qpo, best=best, default_method=METHOD_OF[cfg.eval.method], seed=seed,
                     earlier=pool)
    matches = {m: dict(Counter(row["methods"][m]["match"] for row in result["per_query"])) for m in qpo}
    result.update({
        "target": "replay", "names": split.names, "num_beams": cfg.eval.num_beams, "best_of_n": cfg.eval.best_of_n,
        "data": {"run_dir": str(data_dir), "version": version, "rows": split.rows, "task": split.task,
                 "target": split.target, "setting": split.setting},
        "split": {"test_fraction": test_fraction, "seed": seed,
                  "train_queries": split.trained_queries, "val_queries": len(split.val_acc),
                  "val_rows": split.val_rows,
                  "train_queries_available": train_queries_all, "max_train_queries": limit,
                  "test_queries": len(split.test_acc), "train_rows": split.train.num_rows,
                  "test_rows": len(split.test_rows), "query_overlap": 0, "evaluated_test_queries": len(queries)},
        "policy": {"model": cfg.policy.model, "tokenizer": cfg.policy.tokenizer, "keep_layers": cfg.policy.keep_layers,
                   "max_query_tokens": cfg.policy.max_query_tokens, "max_prompt_tokens": cfg.policy.max_prompt_tokens,
                   "prompt_vocab": cfg.policy.prompt_vocab, "reward_head": cfg.policy.reward_head,
                   "target_reward": cfg.eval.target_reward, "policy_dir": str(out / POLICY_SUBDIR)},
        "training": training, "generation_s": took, "rerank": margin,
        "replay": {"min_similarity": min_similarity, "matches": matches, "unmatched_count_as_incorrect": True},
        "min_train_coverage": min_train_coverage,
        "per_prompt": per_prompt_accuracy(split.train_acc, split.test_acc, pool_keys, split.names),
        "wall_s": round(time.perf_counter() - t_start, 2),
    })
    atomic_write_json(out / EVAL_JSON, result)
    atomic_write_bytes(out / REPORT_MD, render_report(result).encode("utf-8"))
    _record_inference(out, cfg, settings, split, best, margin)
    log.info("offline eval: wrote %s and %s", out / EVAL_JSON, out / REPORT_MD)
    return result


def per_prompt_accuracy(train: AccTable, test: AccTable, prompts: Sequence[str],
                        names: Mapping[str, str]) -> list[dict[str, Any]]:
    """Every recorded prompt's train and test accuracy and coverage, best train accuracy first."""
    rows = []
    for p in prompts:
        tr = [ps[p] for ps in train.values() if p in ps]
        te = [ps[p] for ps in test.values() if p in ps]
        rows.append({"name": names.get(p, p[:40]), "prompt": p,
                     "train_accuracy": sum(tr) / len(tr) if tr else None,
                     "train_coverage": len(tr) / len(train) if train else 0.0,
                     "test_accuracy": sum(te) / len(te) if te else None, "test_coverage": len(te) / len(test)})
    return sorted(rows, key=lambda r: (-(r["train_accuracy"] or 0.0), r["name"]))


# -- reporting ---------------------------------------------------------------------------------------------
def _f(x: Any) -> str:
    return "–" if x is None else (f"{x:.3f}" if isinstance(x, float) else str(x))


def _margin_fact(m: Mapping[str, Any]) -> str:
    if not m.get("fitted"):
        return f"- **rerank margin**: {m['margin']:g} (eval.rerank_margin)"
    if not m["val_queries"]:
        return "- **rerank margin**: 0 (no validation query has the best single prompt recorded)"
    zero = m["curve"][0]
    return (f"- **rerank margin**: {m['margin']:.3f}, fitted on {m['val_queries']} validation queries held out of "
            f"training (the largest gain whose 95% interval is above 0, else never switch): there rerank leaves the "
            f"best single prompt on {100 * m['switch_share']:.0f}% of them, {m['val_gain_pts']:+.2f} pts (margin 0: "
            f"{100 * zero['switch_share']:.0f}%, {zero['gain_pts']:+.2f} pts "
            f"[{zero['gain_ci_pts'][0]:+.2f}, {zero['gain_ci_pts'][1]:+.2f}])")


def render_report(result: Mapping[str, Any]) -> str:
    d, s, tr = result["data"], result["split"], result["training"]
    pol = result["policy"]
    facts = [
        f"- **data**: `{d['run_dir']}` v{d['version']:03d}, {d['rows']} rows",
        f"- **split** by unique query text (seed {s['seed']}, test fraction {s['test_fraction']}): "
        f"train {s['train_queries']} queries / {s['train_rows']} rows"
        + (f", and {s['val_queries']} more queries held out of training to fit rerank's margin"
           if s.get("val_queries") else "")
        + (f" (a seeded sample of the {s['train_queries_available']} train queries: task.max_train_queries)"
           if s["train_queries"] < s["train_queries_available"] else "")
        + f", test {s['test_queries']} queries / {s['test_rows']} rows, 0 queries in both; evaluated on "
        f"{s['evaluated_test_queries']} test queries",
        f"- **policy**: `{pol['model']}` (tokenizer `{pol['tokenizer']}`, keep_layers {pol['keep_layers']}, "
        f"{pol['max_query_tokens']} query / {pol['max_prompt_tokens']} prompt tokens, prompt vocabulary "
        f"`{pol['prompt_vocab']}`, reward head `{pol['reward_head']}`, r = {pol['target_reward']:g})",
        f"- **training**: {tr['wall_s']:.1f} s wall, {tr['epochs']} epoch(s) on {tr['train_rows']} rows"
        + (" (reused from an earlier run)" if tr.get("reused") else "")
        + (f", resumed from epoch {tr['resumed_from_epoch']}" if tr.get("resumed_from_epoch") else "")
        + f"; final loss {_f(tr['final_metrics'].get('loss'))}",
        _margin_fact(result["rerank"]),
        "- **prompt writing**: " + ", ".join(f"{k} {v:.1f} s" for k, v in result["generation_s"].items()),
        "- **replay of QPO prompts** (exact / approx = the most similar recorded prompt of that query with "
        f"token Jaccard ≥ {result['replay']['min_similarity']} / none = unmatched, counted incorrect): "
        + "; ".join(f"{m}: " + ", ".join(f"{k} {v}" for k, v in sorted(c.items()))
                    for m, c in result["replay"]["matches"].items()),
    ]
    title = f"Offline evaluation (replay) — {d['task']} / {d['target']} ({d['setting']})"
    lines = [render_eval(result, title, facts), "## Every recorded prompt", "",
             "| prompt | train accuracy | train coverage | test accuracy | test coverage |", "|---|---|---|---|---|"]
    lines += [f"| {x['name']} | {_f(x['train_accuracy'])} | {_f(x['train_coverage'])} | {_f(x['test_accuracy'])} | "
              f"{_f(x['test_coverage'])} |" for x in result["per_prompt"]]
    lines.append("")
    return "\n".join(lines)


__all__ = ["MIN_TRAIN_COVERAGE", "OfflineSplit", "evaluate_offline", "per_prompt_accuracy", "render_report"]
