"""train — policy-training tokens/s: Ray Train + DeepSpeed vs a plain PyTorch loop.

Ours: ``qpo_ray.train.train_policy`` on a DatasetStore version (1 worker, ZeRO 0, CPU): Ray Data streams and
tokenises the rows, the Train worker runs a DeepSpeed engine. Its per-epoch history reports
``tokens_per_s`` (prompt + query tokens of the applied micro-batches / the epoch's loop time, checkpoint
excluded) and ``epoch_time_s``.

Baseline: the same model (``QPOPolicy.from_config`` with the same PolicyConfig and seed), the same rows
(read back from the store, rewards normalised with the manifest range, tokenised once with
``encode_rows``), the same micro-batch size, gradient accumulation, clipping, AdamW and number of steps,
in a plain ``for`` loop in this process.

Warm-up is excluded on both sides: only epochs 2..N count (epoch 1 pays Ray Data start-up, DeepSpeed's first
step, allocator growth). Both sides use the same torch thread count (``--threads``): it is exported as
OMP_NUM_THREADS before Ray starts, so the Train worker inherits it instead of Ray's 1-per-CPU default,
and the worker's actual value is read from its environment while it runs.

The model is tiny-gpt2 with hidden 256 and 4 layers (GPT-2's 50k vocabulary, 40+41 token rows): small,
but big enough that compute dominates per-step framework costs the way it does on real runs.
For information, the same training on 2 workers (each with threads/2) is reported too.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from benchmarks._common import RssSampler, emotion_pairs, main, result, start_ray, stop_ray, workdir

NAME = "train"
GOAL = 0.85


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rows", type=int, default=64, help="dataset rows (a multiple of micro-batch × accumulation)")
    p.add_argument("--epochs", type=int, default=2, help="epochs per side; epochs 2..N are compared")
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--grad-accum", type=int, default=2, help="gradient accumulation steps on 1 worker")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--two-workers", dest="two_workers", action="store_true", default=True,
                   help="also train on 2 workers (information only; default on)")
    p.add_argument("--no-two-workers", dest="two_workers", action="store_false")
    p.add_argument("--two-workers-epochs", type=int, default=2, help="epochs of the 2-worker run (epochs 2..N count)")


def quick(args: argparse.Namespace) -> None:
    args.rows, args.epochs, args.micro_batch, args.grad_accum = 32, 2, 8, 2
    args.hidden, args.layers, args.heads, args.two_workers = 64, 2, 2, False


def make_config(args: argparse.Namespace, run_dir: Path, workers: int, epochs: int | None = None):
    from qpo_ray.config import load_config

    batch = args.micro_batch * args.grad_accum
    return load_config("tiny", [
        f"run_dir={run_dir}", "policy.model=tiny-gpt2", "policy.tokenizer=gpt2", "policy.max_query_tokens=40",
        "policy.max_prompt_tokens=40", f"policy.tiny_hidden={args.hidden}", f"policy.tiny_layers={args.layers}",
        f"policy.tiny_heads={args.heads}", f"train.num_workers={workers}", "train.zero_stage=0",
        f"train.batch_size={batch}", f"train.micro_batch_size={args.micro_batch}", "train.max_failures=0",
        f"train.scratch.epochs={epochs or args.epochs}", "train.lr_step_epochs=100",
    ])


def make_store(args: argparse.Namespace, run_dir: Path):
    import random

    from qpo_ray.data.schema import rows_to_table
    from qpo_ray.data.store import DatasetStore

    rng = random.Random(0)
    rows = [dict(task="emotion", setting="zero_shot", target="smollm2", source="offline:bench", loop=0,
                 reward=rng.uniform(-10.0, 10.0), **p) for p in emotion_pairs(args.rows)]
    store = DatasetStore(run_dir)
    store.commit([rows_to_table(rows)], note="bench train")
    return store


def steady(history: list[dict]) -> dict:
    """tokens/s over epochs 2..N (the tokens each epoch processed / the time its loop took)."""
    hs = history[1:] if len(history) > 1 else history
    tokens = sum(h["tokens_per_s"] * h["epoch_time_s"] for h in hs)
    secs = sum(h["epoch_time_s"] for h in hs)
    return {"tokens_per_s": tokens / secs, "epoch_tokens": [round(h["tokens_per_s"] * h["epoch_time_s"]) for h in history],
            "epoch_time_s": [round(h["epoch_time_s"], 2) for h in history],
            "epoch_tokens_per_s": [round(h["tokens_per_s"], 1) for h in history],
            "steps_per_epoch": [h["steps"] for h in history], "loss": [round(h["loss"], 4) for h in history]}


def ray_side(args: argparse.Namespace, root: Path, store, workers: int, tag: str, epochs: int | None = None) -> dict:
    from qpo_ray.train import train_policy

    cfg = make_config(args, root, workers, epochs)
    t0 = time.perf_counter()
    with RssSampler(interval=1.0, watch="RayTrainWorker", pss=False) as mon:
        res = train_policy(cfg, store=store, version=0, out_dir=root / f"policy-{tag}", schedule="scratch",
                           run_name=f"bench-{tag}")
    wall = time.perf_counter() - t0
    out = steady(res.history)
    out["wall_s"] = round(wall, 1)
    out["outside_epoch_loops_s"] = round(wall - sum(h["epoch_time_s"] for h in res.history), 1)
    out["worker_env"] = sorted({w["omp_num_threads"] for w in mon.watched.values()}, key=str)
    return out


def baseline(args: argparse.Namespace, store, cfg) -> dict:
    import numpy as np
    import torch

    from qpo_ray.data.store import normalize_reward
    from qpo_ray.policy.loss import qpo_loss
    from qpo_ray.policy.model import QPOPolicy
    from qpo_ray.policy.tokenize import encode_rows
    from qpo_ray.train.loader import READ_COLUMNS
    from qpo_ray.train.worker import grad_accum_steps, seed_everything, step_lr

    tcfg, pcfg = cfg.train, cfg.policy
    seed_everything(tcfg.seed)
    policy = QPOPolicy.from_config(pcfg, seed=tcfg.seed)
    policy.train()
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tcfg.scratch.lr, weight_decay=tcfg.weight_decay)
    gas = grad_accum_steps(tcfg, 1)
    m = store.manifest(0)
    table = store.read_table(0, columns=READ_COLUMNS)
    raw = np.asarray(table.column("reward").to_numpy(), dtype=np.float64)
    norm = np.broadcast_to(normalize_reward(raw, m.reward_min, m.reward_max), raw.shape).astype(np.float32)
    enc = encode_rows(policy.tokenizer, table.column("query").to_pylist(), table.column("prompt").to_pylist(), norm,
                      pcfg.max_query_tokens, pcfg.max_prompt_tokens)
    data = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in enc.items()}
    n = len(norm)
    gen = torch.Generator().manual_seed(tcfg.seed)
    mb = tcfg.micro_batch_size
    history = []
    for epoch in range(tcfg.scratch.epochs):
        for g in opt.param_groups:
            g["lr"] = step_lr(tcfg.scratch.lr, epoch, tcfg.lr_step_epochs, tcfg.lr_gamma)
        perm = torch.randperm(n, generator=gen)
        micro = n // mb
        steps = micro // gas
        tokens, losses = 0.0, []
        t0 = time.perf_counter()
        for s in range(steps):
            for j in range(gas):
                idx = perm[(s * gas + j) * mb:(s * gas + j + 1) * mb]
                b = {k: v[idx] for k, v in data.items()}
                logits, reward_pred = policy(query_ids=b["query_ids"], query_mask=b["query_mask"],
                                             prompt_ids=b["prompt_ids"], prompt_mask=b["prompt_mask"],
                                             reward=b["reward"])
                loss, met = qpo_loss(logits, reward_pred, b, lambda_high=tcfg.lambda_high,
                                     lambda_low=tcfg.lambda_low, mse_switch=tcfg.mse_switch)
                (loss / gas).backward()  # DeepSpeed scales by 1/gas the same way
                losses.append(met["loss"])
                tokens += float(b["query_mask"].sum() + b["prompt_mask"].sum())
            torch.nn.utils.clip_grad_norm_(params, tcfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - t0
        history.append({"tokens_per_s": tokens / elapsed, "epoch_time_s": elapsed, "steps": steps,
                        "loss": float(np.mean(losses))})
    return steady(history)


def run(args: argparse.Namespace) -> dict:
    import torch

    if args.rows % (args.micro_batch * args.grad_accum):
        raise ValueError("--rows must be a multiple of --micro-batch × --grad-accum (equal steps on both sides)")
    threads = args.threads
    with workdir(args, "train") as root:
        root = Path(root)
        store = make_store(args, root)
        cfg = make_config(args, root, 1)
        start_ray()
        try:
            from benchmarks._common import ray_worker_threads

            probe = ray_worker_threads()
            ours = ray_side(args, root, store, 1, "1w")
            base = baseline(args, store, cfg)
            two = None
            if args.two_workers:
                # Each of the 2 workers gets half the threads: restart Ray so its processes inherit that.
                stop_ray()
                os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(max(1, threads // 2))
                start_ray()
                try:
                    two = ray_side(args, root, store, 2, "2w", args.two_workers_epochs)
                finally:
                    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
        finally:
            stop_ray()
    raw = {"model": f"tiny-gpt2 hidden {args.hidden}, {args.layers} layers, {args.heads} heads, vocab 50257",
           "rows": args.rows, "epochs": args.epochs, "micro_batch": args.micro_batch, "grad_accum": args.grad_accum,
           "compared_epochs": f"2..{args.epochs}" if args.epochs > 1 else "1",
           "threads_driver": torch.get_num_threads(), "threads_ray_actor_probe": probe,
           "ray_worker_omp_num_threads": ours.pop("worker_env"), "ours": ours, "baseline": base}
    notes = []
    if ours["steps_per_epoch"] != base["steps_per_epoch"]:
        notes.append(f"steps per epoch differ: ours {ours['steps_per_epoch']} vs baseline {base['steps_per_epoch']}")
    if ours["epoch_tokens"] != base["epoch_tokens"]:
        notes.append(f"tokens per epoch differ: ours {ours['epoch_tokens']} vs baseline {base['epoch_tokens']}")
    if two is not None:
        two.pop("worker_env", None)
        raw["two_workers"] = {**two, "threads_per_worker": max(1, threads // 2),
                              "speedup_vs_1_worker": round(two["tokens_per_s"] / ours["tokens_per_s"], 3)}
    ok_equal = not notes
    res = result(NAME, ratio=ours["tokens_per_s"] / base["tokens_per_s"], goal=GOAL, op=">=",
                 ours=ours["tokens_per_s"], baseline=base["tokens_per_s"], units="tokens/s (epochs 2..N)",
                 raw=raw, notes=notes)
    res["ok"] = res["ok"] and ok_equal
    return res


if __name__ == "__main__":
    raise SystemExit(main(NAME, add_args, quick, run))
