"""serve — a small /v1/prompts request's latency while 8 maximum-size requests are in flight.

One policy-service replica (``qpo_ray.serve.deployment.build_api``: the app each Serve replica runs, here
behind an in-process ASGI client, so the figures are the replica's batching and generation, not Serve's
proxy) on the tiny policy. Eight clients each keep one request of ``serve.max_queries_per_request`` (64)
queries of ``serve.max_query_chars`` (4,000) characters in flight; meanwhile one client sends small
requests (one short query) one after another and records each one's latency.

Two settings in the same run: ours (``serve.max_batch_queries`` as configured: a big request is generated in
slices that take turns with other requests) and the baseline with batches bounded by requests only
(``serve.max_batch_queries`` = every query of ``serve.max_batch_size`` requests: one batch may hold all 8
big requests, and the small request waits for it). Also the small request's latency with nothing else in
flight.

ratio = small p99 ours / small p99 baseline; goal: small p99 ours ≤ 2 s.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from benchmarks._common import main, result

NAME = "serve"
GOAL_S = 2.0


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--small", type=int, default=40, help="small requests measured with ours and alone")
    p.add_argument("--baseline-small", type=int, default=5,
                   help="small requests measured with the baseline (each waits for a whole big batch)")
    p.add_argument("--big", type=int, default=8, help="maximum-size requests kept in flight")
    p.add_argument("--queries", type=int, default=64, help="queries per big request")
    p.add_argument("--chars", type=int, default=4000, help="characters per query of a big request")
    p.add_argument("--batch-queries", type=int, default=None, help="serve.max_batch_queries [the config's]")


def quick(args: argparse.Namespace) -> None:
    args.small, args.baseline_small, args.big, args.queries, args.chars = 8, 3, 2, 40, 500


def _p(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def _app(policy_dir, sets: list[str]):
    from qpo_ray.policy.served import load_served
    from qpo_ray.serve.deployment import Replica, build_api

    served = load_served(policy_dir, "tiny", sets)
    rep = Replica(str(policy_dir), served.to_dict())
    return build_api(rep), rep


async def _measure(app, args: argparse.Namespace, load: bool, small: int) -> dict:
    import httpx

    words = "the quick brown fox jumps over the lazy dog and keeps running far away "
    big_query = (words * (args.chars // len(words) + 1))[: args.chars]
    big_body = {"queries": [f"{i} {big_query}"[: args.chars] for i in range(args.queries)]}
    stop = asyncio.Event()
    big_done: list[float] = []

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://svc", timeout=600) as c:
        async def big_client():
            while not stop.is_set():
                t = time.perf_counter()
                r = await c.post("/v1/prompts", json=big_body)
                r.raise_for_status()
                big_done.append(time.perf_counter() - t)

        # One small request first: warm-up (first batch, tokenizer caches).
        (await c.post("/v1/prompts", json={"query": "warm up"})).raise_for_status()
        bigs = [asyncio.create_task(big_client()) for _ in range(args.big)] if load else []
        await asyncio.sleep(0.5 if load else 0)
        lat = []
        for i in range(small):
            t = time.perf_counter()
            r = await c.post("/v1/prompts", json={"query": f"how was your day {i}?"})
            r.raise_for_status()
            lat.append(time.perf_counter() - t)
        stop.set()
        await asyncio.gather(*bigs)
    return {"n": len(lat), "p50_s": round(_p(lat, 0.5), 3), "p99_s": round(_p(lat, 0.99), 3),
            "max_s": round(max(lat), 3),
            "big_requests_done": len(big_done),
            "big_p50_s": round(statistics.median(big_done), 2) if big_done else None}


def run(args: argparse.Namespace) -> dict:
    from benchmarks._common import workdir
    from qpo_ray.config import load_config
    from qpo_ray.policy import QPOPolicy

    cfg = load_config("tiny")
    scfg = cfg.serve
    ours_q = args.batch_queries or scfg.max_batch_queries
    base_q = scfg.max_batch_size * scfg.max_queries_per_request
    limits = [f"serve.max_queries_per_request={max(args.queries, 1)}", f"serve.max_query_chars={max(args.chars, 1)}"]
    with workdir(args, "serve") as root:
        from pathlib import Path

        policy_dir = Path(root) / "policy"
        QPOPolicy.from_config(cfg.policy).save(policy_dir)
        raw: dict = {"policy": "tiny (profile tiny)",
                     "big": f"{args.big} × {args.queries} queries × {args.chars} chars",
                     "max_batch_size": scfg.max_batch_size, "ours_max_batch_queries": ours_q,
                     "baseline_max_batch_queries": base_q}
        app, _ = _app(policy_dir, [*limits, f"serve.max_batch_queries={ours_q}"])
        raw["alone"] = asyncio.run(_measure(app, args, load=False, small=args.small))
        raw["ours"] = asyncio.run(_measure(app, args, load=True, small=args.small))
        app, _ = _app(policy_dir, [*limits, f"serve.max_batch_queries={base_q}"])
        raw["baseline"] = asyncio.run(_measure(app, args, load=True, small=args.baseline_small))
    ours, base = raw["ours"]["p99_s"], raw["baseline"]["p99_s"]
    return result(NAME, ratio=ours / base if base else float("nan"), goal=GOAL_S, op="<=", ours=ours, baseline=base,
                  units="s (small request p99 with the big ones in flight)", raw=raw,
                  ok=ours <= GOAL_S, goal_text=f"p99 ≤ {GOAL_S:g} s",
                  limited_by=f"one slice of {ours_q} maximum-size queries: the batch a small request arrives during "
                             "runs to its end before the next one takes the small request")


if __name__ == "__main__":
    import sys

    sys.exit(main(NAME, add_args, quick, run))
