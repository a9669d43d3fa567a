"""The run report: report.md (a table per loop), accuracy.png (accuracy per loop, one line per method)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from qpo_ray.evaluate.baselines import METHODS


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return "–" if math.isnan(x) else f"{x:.3f}"
    return str(x)


def summary_table(evals: list[dict[str, Any]]) -> str:
    """One markdown table: accuracy of every method at D0 and after each loop."""
    head = "| method | " + " | ".join("D0" if e["loop"] == 0 else f"loop {e['loop']}" for e in evals) + " |"
    sep = "|---" * (len(evals) + 1) + "|"
    lines = [head, sep]
    for m in METHODS:
        cells = [_fmt(e["methods"].get(m, {}).get("accuracy", float("nan"))) for e in evals]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(run_dir: Path, evals: list[dict[str, Any]], steps: list[dict[str, Any]], header: dict[str, Any]) -> Path:
    """Write report.md and accuracy.png into the run directory; returns the report's path."""
    lines = [f"# QPO run report — {header.get('task')} ({header.get('setting')})", ""]
    for k, v in header.items():
        lines.append(f"- **{k}**: {v}")
    lines += ["", "## Test accuracy per loop", "", summary_table(evals), "",
              "QPO = the policy's greedy prompt per query, conditioned on r = 100; best_offline = the pool prompt "
              "with the highest mean reward on the train queries; random_offline = mean over the pool; "
              "oracle = the best pool prompt per query (upper bound).", ""]
    for e in evals:
        title = "D0 (offline data only)" if e["loop"] == 0 else f"Loop {e['loop']}"
        lines += [f"## {title}", "", "| method | accuracy | mean reward | queries |", "|---|---|---|---|"]
        for m in METHODS:
            s = e["methods"].get(m)
            if s:
                lines.append(f"| {m} | {_fmt(s['accuracy'])} | {_fmt(s['mean_reward'])} | {s['n']} |")
        if e["methods"].get("best_offline", {}).get("prompt") is not None:
            lines.append(f"\nBest offline prompt: `{e['methods']['best_offline']['prompt']!r}`")
        if e.get("examples"):
            lines += ["", "QPO prompts (first few test queries):", ""]
            for ex in e["examples"]:
                lines.append(f"- `{ex['query'][:80]}` → `{ex['prompt'][:120]}` (correct={_fmt(ex['correct'])})")
        lines.append("")
    lines += ["## Cost and time per step", "", "| step | wall s | target calls | target tokens |", "|---|---|---|---|"]
    for s in steps:
        lines.append(f"| {s['step']} | {s.get('wall_s', 0):.1f} | {s.get('target_calls', 0)} | {s.get('target_tokens', 0)} |")
    tot_calls = sum(s.get("target_calls", 0) for s in steps)
    tot_tokens = sum(s.get("target_tokens", 0) for s in steps)
    lines += ["", f"Total target calls: {tot_calls}; total target tokens: {tot_tokens}; "
                  f"wall time: {sum(s.get('wall_s', 0) for s in steps):.1f} s", ""]
    png = _plot(run_dir, evals)
    if png:
        lines += ["![accuracy per loop](accuracy.png)", ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _plot(run_dir: Path, evals: list[dict[str, Any]]) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    xs = [e["loop"] for e in evals]
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in METHODS:
        ys = [e["methods"].get(m, {}).get("accuracy", float("nan")) for e in evals]
        ax.plot(xs, ys, marker="o", label=m, linewidth=2.5 if m == "qpo" else 1.2)
    ax.set_xlabel("loop (0 = offline data only)")
    ax.set_ylabel("test accuracy")
    ax.set_xticks(xs)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = run_dir / "accuracy.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
