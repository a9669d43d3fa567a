"""The one evaluation: QPO's prompts against fixed-prompt baselines on held-out test queries.

Live (a target LLM scores every pair) and replay (recorded logs answer every pair) differ only in the
*judge*, the function that says how correct a (query, prompt) pair is. Everything else is here, once:

- the **pool table**: every pool prompt judged on every test query (``None`` where the judge has no
  answer, e.g. a recorded prompt that was not logged on that query);
- the **baselines**: ``no_instruction`` (the empty prompt, where the pool has one), ``best_single`` (the pool
  prompt with the highest accuracy on the TRAIN queries, among those recorded on at least
  ``MIN_TRAIN_COVERAGE`` of them), ``random`` (per query, the mean over its pool prompts: the expected
  accuracy of a prompt drawn at random), ``kind_oracle`` (where queries have kinds: for each kind, the pool
  prompt best on that kind's test queries, chosen in hindsight) and ``oracle`` (per query, the best pool
  prompt: an upper bound for any method that picks among the pool);
- the **QPO methods** (their prompts come from the policy, see ``qpo_ray.evaluate.policy_prompts``);
- for every QPO method against ``best_single`` and ``no_instruction`` (and, in ``claims``, against rerank,
  the per-kind and the per-query oracle): the mean paired difference over the test queries with a paired
  bootstrap 95% interval (``qpo_ray.evaluate.stats``);
- for every QPO method: how many distinct prompts it wrote, the share of pool prompts, of new prompts (in
  none of ``earlier``, the prompts the policy was trained on) and of degenerate ones;
- ``per_query``: every method's prompt and correctness on every test query, so that any figure can be
  recomputed from the JSON.

Accuracy of a method = mean correctness over the test queries where it has a value (a QPO prompt always
has one: a judge that cannot answer it counts it as incorrect).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from qpo_ray.data.schema import normalize_text
from qpo_ray.errors import DataError
from qpo_ray.evaluate.stats import paired_bootstrap, prompt_stats

MIN_TRAIN_COVERAGE = 0.9
BASELINES = ("no_instruction", "best_single", "random", "kind_oracle", "oracle")
QPO_METHODS = ("qpo_greedy", "qpo_best_of_n", "qpo_rerank")
COMPARED_WITH = ("best_single", "no_instruction")
# What QPO claims beyond beating a fixed prompt: the policy's own prompts against selection among the pool
# (rerank, and the best pool prompt for each kind of query, chosen on the test queries themselves).
CLAIMS = ("qpo_rerank", "kind_oracle", "oracle")

# A judge answers pairs: per pair its correctness in [0, 1] (None = no answer) and optional details
# (e.g. how a replayed prompt was matched).
Judge = Callable[[Sequence[tuple[str, str]]], list[tuple[float | None, dict[str, Any]]]]
# Accuracy table: normalised query -> normalised prompt -> mean correctness.
AccTable = dict[str, dict[str, float]]


def accuracy_table(rows: Iterable[Mapping[str, Any]]) -> AccTable:
    """Per (normalised query, normalised prompt): the mean of ``correct`` over its rows (repeats).

    Rows without a ``correct`` value are an error: accuracy needs correctness."""
    sums: dict[str, dict[str, list[float]]] = defaultdict(dict)
    for i, r in enumerate(rows):
        c = r.get("correct")
        if c is None or (isinstance(c, float) and math.isnan(c)):
            raise DataError(f"row {i} (query {str(r.get('query'))[:60]!r}): no 'correct' value; evaluation needs "
                            "correctness (import logs with a correct column or --format oirl)")
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


@dataclass(frozen=True)
class EvalQuery:
    """A held-out query; ``group`` is its kind when the task has kinds (for the report's examples)."""

    query: str
    label: str | None = None
    group: str | None = None


def pool_table(queries: Sequence[EvalQuery], pool: Sequence[str], judge: Judge) -> list[dict[str, float | None]]:
    """Per test query: every pool prompt's correctness (``None`` when the judge has no answer)."""
    answers = judge([(q.query, p) for q in queries for p in pool])
    it = iter(answers)
    return [{p: next(it)[0] for p in pool} for _ in queries]


def best_single_on_train(train_acc: AccTable, pool: Sequence[str],
                         min_coverage: float = MIN_TRAIN_COVERAGE) -> dict[str, Any] | None:
    """The pool prompt with the highest mean TRAIN accuracy among those recorded on ≥ ``min_coverage`` of the
    train queries (ties: coverage, then text); None when no prompt qualifies."""
    n = len(train_acc)
    rows = []
    for p in pool:
        key = normalize_text(p)
        accs = [ps[key] for ps in train_acc.values() if key in ps]
        if n and accs and len(accs) / n >= min_coverage:
            rows.append((-sum(accs) / len(accs), -len(accs), p, sum(accs) / len(accs), len(accs) / n))
    if not rows:
        return None
    _, _, prompt, acc, cov = min(rows)
    return {"prompt": prompt, "train_accuracy": acc, "train_coverage": cov}


def kind_best(groups: Sequence[str | None], table: Sequence[Mapping[str, float | None]],
              pool: Sequence[str]) -> dict[str | None, str]:
    """Per kind of query, the pool prompt with the highest mean correctness on that kind's queries (ties: the
    earlier prompt in the pool)."""
    out = {}
    for g in dict.fromkeys(groups):
        rows = [t for gg, t in zip(groups, table, strict=True) if gg == g]
        out[g] = max(pool, key=lambda p: (_mean([t[p] for t in rows]) or 0.0, -pool.index(p)))
    return out


def _mean(xs: Sequence[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return sum(vals) / len(vals) if vals else None


def compare(queries: Sequence[EvalQuery], pool: Sequence[str], table: Sequence[Mapping[str, float | None]],
            judge: Judge, qpo: Mapping[str, Sequence[str]], *, best: Mapping[str, Any] | None,
            default_method: str | None = None, seed: int = 0, earlier: Sequence[str] | None = None) -> dict[str, Any]:
    """Baselines from ``table`` and the QPO methods' prompts judged by ``judge``; see the module doc.

    ``qpo`` maps a method name to one prompt per test query; ``best`` is :func:`best_single_on_train`'s
    choice. ``default_method`` names the QPO method a headline "QPO" figure means."""
    n = len(queries)
    if len(table) != n:
        raise ValueError(f"{len(table)} pool rows for {n} queries")
    per_query: list[dict[str, Any]] = [{"query": q.query, "label": q.label, "group": q.group, "methods": {}}
                                       for q in queries]
    values: dict[str, list[float | None]] = {}

    def record(name: str, prompts: Sequence[str | None], correct: Sequence[float | None],
               details: Sequence[Mapping[str, Any]] | None = None) -> None:
        values[name] = list(correct)
        for i, row in enumerate(per_query):
            row["methods"][name] = {"prompt": prompts[i], "correct": correct[i], **(details[i] if details else {})}

    if "" in pool:
        record("no_instruction", [""] * n, [t[""] for t in table])
    if best is not None:
        record("best_single", [best["prompt"]] * n, [t[best["prompt"]] for t in table])
    record("random", [None] * n, [_mean(list(t.values())) for t in table])
    groups = [q.group for q in queries]
    if all(g is not None for g in groups) and len(set(groups)) > 1:
        per_kind = kind_best(groups, table, pool)
        record("kind_oracle", [per_kind[g] for g in groups],
               [t[per_kind[g]] for g, t in zip(groups, table, strict=True)])
    oracle = [max(((c, p) for p, c in t.items() if c is not None), default=(None, None)) for t in table]
    record("oracle", [p for _, p in oracle], [c for c, _ in oracle])

    stats: dict[str, dict[str, Any]] = {}
    for name, prompts in qpo.items():
        if len(prompts) != n:
            raise ValueError(f"method {name}: {len(prompts)} prompts for {n} queries")
        answers = judge(list(zip((q.query for q in queries), prompts, strict=True)))
        record(name, list(prompts), [c if c is not None else 0.0 for c, _ in answers], [d for _, d in answers])
        stats[name] = prompt_stats(prompts, pool, earlier)

    methods: dict[str, dict[str, Any]] = {}
    for name, vals in values.items():
        known = [v for v in vals if v is not None]
        ci = paired_bootstrap(known, [0.0] * len(known), seed=seed)  # the mean's own interval (error bars)
        methods[name] = {"accuracy": sum(known) / len(known) if known else None, "n": len(known),
                         "ci": [ci["lo"], ci["hi"]]}
    if best is not None:
        methods["best_single"].update(best)
    for name in qpo:
        methods[name]["prompts"] = stats[name]
        methods[name]["vs"] = {b: paired_bootstrap(values[name], values[b], seed=seed)
                               for b in COMPARED_WITH if b in values}
        methods[name]["claims"] = {b: paired_bootstrap(values[name], values[b], seed=seed)
                                   for b in CLAIMS if b in values and b != name}
    default = default_method if default_method in qpo else next(iter(qpo), None)
    return {"queries": n, "pool_size": len(pool), "default_method": default, "methods": methods,
            "per_query": per_query}
