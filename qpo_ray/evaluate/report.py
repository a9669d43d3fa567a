"""The one report renderer, for live runs (``report.md`` + ``accuracy.png``, a section per loop) and replay
evaluations (``offline_report.md``): every QPO-vs-baseline figure with its paired bootstrap 95% interval."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from qpo_ray.atomic import atomic_write_bytes
from qpo_ray.data.schema import normalize_text
from qpo_ray.evaluate.compare import BASELINES, CLAIMS, COMPARED_WITH, QPO_METHODS
from qpo_ray.evaluate.stats import paired_bootstrap

ORDER = (*QPO_METHODS, *BASELINES)
EXAMPLES_PER_KIND = 3


def _f(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _pts(cmp: Mapping[str, Any] | None) -> str:
    """A paired difference in accuracy points: ``+3.1 [+0.4, +5.9]``, with "tie" when the interval holds 0."""
    if not cmp or cmp.get("diff") is None:
        return "–"
    text = f"{100 * cmp['diff']:+.1f} [{100 * cmp['lo']:+.1f}, {100 * cmp['hi']:+.1f}]"
    return text + (" tie" if cmp["tie"] else "")


def method_label(name: str, result: Mapping[str, Any], names: Mapping[str, str] | None = None) -> str:
    m = result["methods"][name]
    label = {
        "qpo_greedy": "QPO, the policy's prompt" + (f" (beam {result.get('num_beams')})"
                                                   if (result.get("num_beams") or 1) > 1 else " (greedy)"),
        "qpo_best_of_n": f"QPO best-of-{result.get('best_of_n', 'N')} (ranked by r̂)",
        "qpo_rerank": "QPO rerank (pool prompts ranked by r̂)",
        "no_instruction": "no instruction",
        "best_single": "best single prompt on train" + (f" (`{prompt_name(m.get('prompt'), names)}`)"
                                                        if m.get("prompt") is not None else ""),
        "random": "random pool prompt (expected)",
        "kind_oracle": "per-kind oracle over the pool (best pool prompt per kind, on test)",
        "oracle": "per-query oracle over the pool (upper bound)",
    }[name]
    return label + (" ★" if name == result.get("default_method") else "")


def prompt_name(prompt: str | None, names: Mapping[str, str] | None) -> str:
    if prompt is None:
        return "–"
    name = (names or {}).get(normalize_text(prompt))
    if name:
        return name
    t = " ".join(prompt.split())
    return (t[:60] + "…") if len(t) > 60 else (t or "<empty>")


def methods_table(result: Mapping[str, Any], names: Mapping[str, str] | None = None) -> str:
    """Accuracy of every method, its interval, and each QPO method's paired difference to the baselines."""
    head = ("| method | test accuracy [95% CI] | n | Δ vs best single, pts [95% CI] | "
            "Δ vs no instruction, pts [95% CI] | distinct prompts | verbatim pool | new | degenerate |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for name in ORDER:
        m = result["methods"].get(name)
        if m is None:
            continue
        lo, hi = m.get("ci") or (None, None)
        acc = f"{_f(m['accuracy'])} [{_f(lo)}, {_f(hi)}]" if lo is not None else _f(m["accuracy"])
        vs = m.get("vs", {})
        ps = m.get("prompts") or {}
        share = (lambda x: "–" if x is None else f"{100 * x:.0f}%")  # noqa: E731
        lines.append(f"| {method_label(name, result, names)} | {acc} | {m['n']} | {_pts(vs.get(COMPARED_WITH[0]))} | "
                     f"{_pts(vs.get(COMPARED_WITH[1]))} | {ps.get('distinct', '–')} | "
                     f"{share(ps.get('verbatim_pool_share'))} | {share(ps.get('new_share'))} | "
                     f"{share(ps.get('degenerate_share'))} |")
    return "\n".join(lines)


def claims_table(result: Mapping[str, Any], names: Mapping[str, str] | None = None) -> list[str]:
    """Each QPO method against selection among the pool: rerank, the per-kind and the per-query oracle."""
    rows = [(n, result["methods"][n]) for n in QPO_METHODS if n in result["methods"]]
    cols = [c for c in CLAIMS if any(c in m.get("claims", {}) for _, m in rows)]
    if not rows or not cols:
        return []
    lines = ["| method | " + " | ".join(f"Δ vs {method_label(c, result, names).split(' (')[0]}, pts [95% CI]"
                                         for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, m in rows:
        lines.append(f"| {method_label(name, result, names)} | "
                     + " | ".join(_pts(m.get("claims", {}).get(c)) for c in cols) + " |")
    return lines


def loop_over_loop(evals: Sequence[Mapping[str, Any]], seed: int = 0) -> dict[str, Any]:
    """Per QPO method: accuracy at the last loop minus loop 1 on the same test queries, paired, with its
    interval (the baselines judge the same pool every loop)."""
    loops = [e for e in evals if e["loop"] >= 1]
    if len(loops) < 2:
        return {}
    first, last = loops[0], loops[-1]
    if [r["query"] for r in first["per_query"]] != [r["query"] for r in last["per_query"]]:
        return {}
    out = {}
    for name in QPO_METHODS:
        if name in first["methods"] and name in last["methods"]:
            a = [r["methods"][name]["correct"] for r in last["per_query"]]
            b = [r["methods"][name]["correct"] for r in first["per_query"]]
            out[name] = {"first": first["loop"], "last": last["loop"], **paired_bootstrap(a, b, seed=seed)}
    return out


def generated_lines(gen: Mapping[str, Any] | None, names: Mapping[str, str] | None = None) -> list[str]:
    """A loop's "generated vs source" (evaluate/generated.py) as markdown."""
    if not gen:
        return []
    share = gen.get("new_share")
    lines = [f"Collect: the target scored {gen['scored']} chosen pairs, {gen['new']} of them with a new prompt "
             f"({'–' if share is None else f'{100 * share:.0f}%'}; {gen.get('new_prompts', 0)} distinct new prompts)."]
    vs = gen.get("vs") or {}
    if vs:
        lines += ["", f"**Generated vs source** on the {gen['queries']} collect queries that got a new prompt "
                      "(paired over queries; the pool scored on the same queries):", "",
                  "| measure | new prompts | vs best single on train | vs best pool prompt on these queries | "
                  "vs per-query pool oracle |", "|---|---|---|---|---|"]
        for key, label, scale in (("correct", "accuracy", 100.0), ("reward", "raw reward", 1.0)):
            v = vs.get(key)
            if not v:
                continue
            cells = []
            for other in ("best_single", "best_pool_here", "oracle"):
                c = v.get(other) or {}
                if c.get("diff") is None:
                    cells.append("–")
                    continue
                unit = " pts" if scale == 100.0 else ""
                cells.append(f"{_f(c.get('mean'))}: {scale * c['diff']:+.1f}{unit} [{scale * c['lo']:+.1f}, "
                             f"{scale * c['hi']:+.1f}]" + (" tie" if c["tie"] else ""))
            lines.append(f"| {label} | {_f(v['generated'])} | " + " | ".join(cells) + " |")
        lines += ["", f"Best single on train: `{prompt_name(gen.get('best_single'), names)}`; best pool prompt on "
                      f"these queries: `{prompt_name(gen.get('best_pool_here'), names)}`. New prompts that beat every "
                      f"pool prompt on the queries they were scored on: {gen.get('beats_pool', 0)}."]
    top = gen.get("top_new") or []
    if top:
        lines += ["", "| best new prompts | queries | accuracy | pair score | best pool prompt there | its pair score "
                      "| beats the pool | won on |", "|---|---|---|---|---|---|---|---|"]
        for t in top:
            won = "; ".join(f"`{q[:40]}`" for q in t["won_on"][:3]) + (" …" if len(t["won_on"]) > 3 else "")
            lines.append(f"| `{t['prompt']}` | {t['queries']} | {_f(t['accuracy'], 2)} | {_f(t['pair_score'], 2)} | "
                         f"`{prompt_name(t['best_pool_prompt'], names)}` | {_f(t['best_pool_pair_score'], 2)} | "
                         f"{'yes' if t['beats_pool'] else 'no'} | {won or '–'} |")
    return lines + [""]


def examples_by_kind(result: Mapping[str, Any], method: str | None, per_kind: int = EXAMPLES_PER_KIND,
                     names: Mapping[str, str] | None = None) -> list[str]:
    """A few test queries of each kind with the prompt ``method`` wrote and whether the target got it right."""
    if method is None:
        return []
    groups: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for row in result["per_query"]:
        groups[row.get("group") or "all"].append(row)
    out = []
    for kind in sorted(groups):
        for row in groups[kind][:per_kind]:
            m = row["methods"].get(method)
            if m is None:
                continue
            shown = f"`{m['prompt']}`" if m["prompt"] else "*(no instruction)*"
            alias = prompt_name(m["prompt"], names)
            note = f" = {alias}" if alias != " ".join((m["prompt"] or "").split()) and m["prompt"] else ""
            out.append(f"- **{kind}** `{row['query'][:80]}` → {shown}{note} (correct {_f(m['correct'], 2)})")
    return out


def chosen_prompts(result: Mapping[str, Any], method: str, names: Mapping[str, str] | None = None) -> list[str]:
    counts: dict[str, int] = defaultdict(int)
    for row in result["per_query"]:
        m = row["methods"].get(method)
        if m is not None:
            counts[prompt_name(m["prompt"], names)] += 1
    return [f"| {k} | {v} |" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])]


EXPLAIN = ("Accuracy = mean correctness over the test queries. Δ = the mean paired difference over the same "
           "test queries, with a paired bootstrap 95% interval (2,000 resamples of the queries); an interval "
           "that holds 0 is a **tie**. best single = the pool prompt with the highest accuracy on the TRAIN "
           "queries. ★ = the profile's default QPO method (`eval.method`). Degenerate = empty, or a word or "
           "short phrase repeated 3+ times in a row.")


def render_eval(result: Mapping[str, Any], title: str, facts: Sequence[str] = ()) -> str:
    """One evaluation (a replay evaluation, or one loop of a run) as markdown."""
    names = result.get("names")
    lines = [f"# {title}", "", *facts, "", "## Test accuracy", "", methods_table(result, names), "", EXPLAIN, ""]
    for method in QPO_METHODS:
        if method in result["methods"]:
            lines += [f"## Prompts of {method_label(method, result, names)}", "", "| prompt | test queries |",
                      "|---|---|", *chosen_prompts(result, method, names), ""]
    ex = examples_by_kind(result, result.get("default_method"), names=names)
    if ex:
        lines += ["## Examples (default method)", "", *ex, ""]
    return "\n".join(lines)


# -- the replay evaluation's report -----------------------------------------------------------------------
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


def _offline_facts(result: Mapping[str, Any]) -> list[str]:
    """The replay evaluation's setup: data, split, policy, training, margin, timing and replay matches."""
    d, s, tr, pol = result["data"], result["split"], result["training"], result["policy"]
    return [
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


def render_offline_report(result: Mapping[str, Any]) -> str:
    """A replay evaluation (``offline_eval.json``) as ``offline_report.md``."""
    d = result["data"]
    title = f"Offline evaluation (replay) — {d['task']} / {d['target']} ({d['setting']})"
    lines = [render_eval(result, title, _offline_facts(result)), "## Every recorded prompt", "",
             "| prompt | train accuracy | train coverage | test accuracy | test coverage |", "|---|---|---|---|---|"]
    lines += [f"| {x['name']} | {_f(x['train_accuracy'])} | {_f(x['train_coverage'])} | {_f(x['test_accuracy'])} | "
              f"{_f(x['test_coverage'])} |" for x in result["per_prompt"]]
    lines.append("")
    return "\n".join(lines)


# -- the run report ---------------------------------------------------------------------------------------
def summary_table(evals: Sequence[Mapping[str, Any]]) -> str:
    """Accuracy of every method per loop; for the QPO default, also Δ vs the best single prompt [95% CI]."""
    cols = ["D0" if e["loop"] == 0 else f"loop {e['loop']}" for e in evals]
    lines = ["| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    present = [n for n in ORDER if any(n in e["methods"] for e in evals)]
    for name in present:
        cells = []
        for e in evals:
            m = e["methods"].get(name)
            cell = _f(m["accuracy"]) if m else "–"
            if m and "vs" in m:
                cell += f" (Δ best {_pts(m['vs'].get('best_single'))})"
            cells.append(cell)
        last = next((e for e in reversed(evals) if name in e["methods"]), evals[-1])
        lines.append(f"| {method_label(name, last, last.get('names'))} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def loop_over_loop_lines(lol: Mapping[str, Any], evals: Sequence[Mapping[str, Any]]) -> list[str]:
    if not lol:
        return []
    last = evals[-1]
    first_loop, last_loop = next(iter(lol.values()))["first"], next(iter(lol.values()))["last"]
    lines = [f"## Loop over loop: loop {last_loop} − loop {first_loop}", "",
             "| method | Δ accuracy, pts [paired 95% CI] |", "|---|---|"]
    lines += [f"| {method_label(n, last, last.get('names'))} | {_pts(c)} |" for n, c in lol.items()]
    return lines + [""]


def write_report(run_dir: Path, evals: Sequence[Mapping[str, Any]], steps: Sequence[Mapping[str, Any]],
                 header: Mapping[str, Any], generated: Mapping[int, Mapping[str, Any]] | None = None,
                 lol: Mapping[str, Any] | None = None) -> Path:
    """Write report.md and accuracy.png into the run directory; returns the report's path. ``generated``: each
    loop's generated-vs-source figures; ``lol``: :func:`loop_over_loop`."""
    lines = [f"# QPO run report — {header.get('task')} ({header.get('setting')})", ""]
    lines += [f"- **{k}**: {v}" for k, v in header.items()]
    lines += ["", "## Test accuracy per loop", "", summary_table(evals), "", EXPLAIN, ""]
    lines += loop_over_loop_lines(lol or {}, evals)
    by_step = {s["step"]: s for s in steps}
    for e in evals:
        loop, names = e["loop"], e.get("names")
        lines += [f"## {'D0 (offline data only)' if loop == 0 else f'Loop {loop}'}", "", methods_table(e, names), ""]
        claims = claims_table(e, names)
        if claims:
            lines += ["The policy's prompts against selection among the pool (the oracles pick on the test "
                      "queries themselves):", "", *claims, ""]
        lines += generated_lines((generated or {}).get(loop), names)
        scored = by_step.get(f"loop-{loop}.score")
        if scored:
            calls = sum(s.get("target_calls", 0) for n, s in by_step.items() if n.startswith(f"loop-{loop}."))
            lines.append(f"Mean raw reward of the loop's {scored.get('rows', 0)} sampled collect prompts: "
                         f"{_f(scored.get('mean_reward'))} (target calls in this loop: {calls})")
            lines.append("")
        ex = examples_by_kind(e, e.get("default_method"), names=names)
        if ex:
            lines += ["Prompts QPO wrote (default method), a few test queries of each kind:", "", *ex, ""]
    lines += ["## Cost and time per step", "", "| step | wall s | target calls | target tokens |", "|---|---|---|---|"]
    for s in steps:
        lines.append(f"| {s['step']} | {s.get('wall_s', 0):.1f} | {s.get('target_calls', 0)} | "
                     f"{s.get('target_tokens', 0)} |")
    lines += ["", f"Total target calls: {sum(s.get('target_calls', 0) for s in steps)}; total target tokens: "
                  f"{sum(s.get('target_tokens', 0) for s in steps)}; wall time of the steps: "
                  f"{sum(s.get('wall_s', 0) for s in steps):.1f} s", ""]
    if _plot(run_dir, evals):
        lines += ["![accuracy per loop, 95% intervals](accuracy.png)", ""]
    path = run_dir / "report.md"
    atomic_write_bytes(path, "\n".join(lines).encode("utf-8"))
    return path


def _plot(run_dir: Path, evals: Sequence[Mapping[str, Any]]) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    present = [n for n in ORDER if any(n in e["methods"] for e in evals)]
    for k, name in enumerate(present):
        pts = [(e["loop"], e["methods"][name]) for e in evals if name in e["methods"]]
        xs = [x + 0.04 * (k - len(present) / 2) for x, _ in pts]  # side by side, so the bars stay readable
        ys = [m["accuracy"] if m["accuracy"] is not None else float("nan") for _, m in pts]
        err = [[max(0.0, y - (m.get("ci") or [y, y])[0]) for y, (_, m) in zip(ys, pts, strict=True)],
               [max(0.0, (m.get("ci") or [y, y])[1] - y) for y, (_, m) in zip(ys, pts, strict=True)]]
        last = evals[-1] if name in evals[-1]["methods"] else next(e for e in evals if name in e["methods"])
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=method_label(name, last, last.get("names")),
                    linewidth=2.5 if name == last.get("default_method") else 1.0)
    loops = [e["loop"] for e in evals]
    ax.set_xticks(loops, ["D0" if x == 0 else f"loop {x}" for x in loops])
    ax.set_ylabel("test accuracy (95% bootstrap interval)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = run_dir / "accuracy.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
