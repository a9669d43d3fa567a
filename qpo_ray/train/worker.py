"""The worker side of training: the Ray Train loop each rank runs around one DeepSpeed engine.

``train_loop_per_worker`` builds the policy (identical initial weights on every rank), runs a DeepSpeed
engine (ZeRO stage 0–3), reports a checkpoint at every epoch end (``qpo_ray.train.checkpoints``) and
resumes from ``get_checkpoint()`` or the newest complete checkpoint in storage.
"""

from __future__ import annotations

import json
import logging
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

import numpy as np

from qpo_ray.allocator import keep_freed_memory
from qpo_ray.config import RunConfig, TrainConfig
from qpo_ray.faults import FAULT_ENV, fault_point
from qpo_ray.train.checkpoints import (
    DS_TAG,
    EPOCH_FILE,
    POLICY_DIR,
    latest_checkpoint,
    mark_complete,
    write_stop,
)
from qpo_ray.train.step_relay import StepPoster

log = logging.getLogger(__name__)

Schedule = Literal["scratch", "finetune"]


# -- pure helpers (tested without Ray) ---------------------------------------------------------------------
def step_lr(base_lr: float, epoch: int, step_epochs: int, gamma: float) -> float:
    """StepLR as a function of the 0-based epoch, so a resumed run derives the same value."""
    return base_lr * gamma ** (epoch // step_epochs)


def grad_accum_steps(tcfg: TrainConfig, world_size: int) -> int:
    return tcfg.batch_size // (tcfg.micro_batch_size * world_size)


def deepspeed_config(tcfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config for the engine. Reduced precision is a GPU feature: on CPU it stays fp32."""
    gpu = tcfg.use_gpu
    zero: dict[str, Any] = {"stage": tcfg.zero_stage}
    if tcfg.zero_stage == 3:
        # Lets engine.save_16bit_model / consolidated state dicts work; export below gathers explicitly.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_batch_size": tcfg.batch_size,
        "train_micro_batch_size_per_gpu": tcfg.micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps(tcfg, world_size),
        "gradient_clipping": tcfg.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": gpu and tcfg.precision == "bf16"},
        "fp16": {"enabled": gpu and tcfg.precision == "fp16"},
        # torch.optim.AdamW is a client optimizer; DeepSpeed only vouches for its own ones under ZeRO.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,  # we log per epoch ourselves
        "wall_clock_breakdown": False,
    }


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def _use_cpu_accelerator() -> None:
    """DeepSpeed picks its accelerator at first use; pin it to CPU before anything asks for it."""
    os.environ["DS_ACCELERATOR"] = "cpu"
    # DeepSpeed JIT-compiles its CPU shm op with whichever `ninja` is first on PATH. Two ninja versions
    # (this environment's and the system's) hash build commands differently, so alternating between them
    # recompiled the op (1–4 CPU-minutes) on every training start. Always use this environment's.
    env_bin = os.path.dirname(sys.executable)
    if (os.path.isfile(os.path.join(env_bin, "ninja"))
            and not os.environ.get("PATH", "").startswith(env_bin + os.pathsep)):
        os.environ["PATH"] = env_bin + os.pathsep + os.environ.get("PATH", "")
    from deepspeed.accelerator import get_accelerator, set_accelerator
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    if get_accelerator().device_name() != "cpu":  # imported earlier in this process with another choice
        set_accelerator(CPU_Accelerator())


def saved_vocab(policy_dir: str) -> list[int] | None:
    """The prompt vocabulary a saved policy was trained with (None: the whole vocabulary)."""
    from qpo_ray.policy.model import POLICY_CONFIG

    return json.loads((Path(policy_dir) / POLICY_CONFIG).read_text(encoding="utf-8")).get("vocab_ids")


def _build_policy(cfg: RunConfig, schedule: Schedule, init_policy: str | None):
    from qpo_ray.policy.model import QPOPolicy

    if schedule == "finetune":
        return QPOPolicy.load(init_policy)
    return QPOPolicy.from_config(cfg.policy, seed=cfg.seed)


def _mean_across_ranks(values: dict[str, float], device) -> dict[str, float]:
    import torch
    import torch.distributed as dist

    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return dict(zip(keys, t.tolist(), strict=True))


def _sum_across_ranks(value: float, device) -> float:
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return float(t.item())


class NonFiniteLoss(Exception):
    """Every rank stops: the loss of a micro-batch (or, at the end, a weight) is not a finite number."""

    def __init__(self, info: dict[str, Any]):
        super().__init__(info)
        self.info = info


def _any_across_ranks(flag: bool, device) -> bool:
    """Whether ``flag`` holds on any rank: every rank gets the same answer, so all stop at the same step
    (a rank that stopped alone would leave the others waiting in a collective)."""
    return _sum_across_ranks(1.0 if flag else 0.0, device) > 0


def _weights_finite(module) -> bool:
    import torch

    # Under ZeRO-3 a parameter holds no data on its own; its rank's partition is ``ds_tensor``.
    return all(bool(torch.isfinite(getattr(p, "ds_tensor", p).detach()).all()) for p in module.parameters())


def _export_policy(engine, stage: int, dest: Path, rank: int) -> None:
    """Write the full policy on rank 0. Under ZeRO-3 the weights are sharded: every rank must join the
    gather, then rank 0 saves the materialised module."""
    import deepspeed

    params = list(engine.module.parameters())  # tied weights appear once, so they stay tied below
    gather = (deepspeed.zero.GatheredParameters(params, modifier_rank=None)
              if stage == 3 else nullcontext())
    with gather:
        if rank == 0:
            # ZeRO 1/2 turn every parameter into a view of one flat buffer; safetensors refuses tensors
            # that do not own their storage. Save from private copies, then put the views back.
            views = [p.data for p in params]
            try:
                for p in params:
                    p.data = p.data.detach().clone()
                engine.module.save(dest)
            finally:
                for p, v in zip(params, views, strict=True):
                    p.data = v


def _epoch_batches(shard, cached: dict | None, *, epoch: int, tcfg: TrainConfig, seed: int, rank: int, device):
    """This rank's micro-batches of one epoch on ``device`` (the engine's): from the rows it holds in memory,
    else streamed by Ray Data."""
    from qpo_ray.train.loader import cached_batches, train_batches

    seed = seed * 1_000_003 + epoch * 1009 + rank
    if cached is not None:
        return cached_batches(cached, tcfg.micro_batch_size, seed, device=device)
    return train_batches(shard, tcfg.micro_batch_size, seed, device=device)


def on_device(batch: dict[str, Any], device) -> dict[str, Any]:
    """The batch's tensors on ``device``: DeepSpeed moves the module to its accelerator, never the inputs.
    A no-op for tensors already there."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _run_epoch(engine, batches, *, epoch: int, tcfg: TrainConfig, gas: int, rank: int,
               on_step: Callable[..., None] | None = None) -> dict[str, float]:
    """One pass over this rank's micro-batches (``batches``, an iterator started by the first ``next``, so
    that streaming's start-up counts in the epoch's time). Micro-batches are applied in groups of ``gas`` so
    every optimizer step sees a full accumulation window; a trailing partial window is dropped (identically on
    every rank, since the shards are equal) instead of leaking its gradients into the next epoch."""
    import torch

    from qpo_ray.policy.loss import qpo_loss_terms

    # Sums stay on the device (0-d tensors): one read per epoch, not a GPU→CPU sync per micro-batch.
    sums: dict[str, Any] = {"loss": 0.0, "ce": 0.0, "mse": 0.0, "lambda": 0.0}
    micro, tokens, pending = 0, 0.0, []
    start = time.perf_counter()
    for batch in batches:
        pending.append(on_device(batch, engine.device))
        if len(pending) < gas:
            continue
        for b in pending:
            logits, reward_pred = engine(query_ids=b["query_ids"], query_mask=b["query_mask"],
                                         prompt_ids=b["prompt_ids"], prompt_mask=b["prompt_mask"],
                                         reward=b["reward"])
            targets = dict(b, prompt_ids=engine.module.head_targets(b["prompt_ids"], b["prompt_mask"]),
                           reward=b["reward_target"] / tcfg.mse_scale)
            loss, m = qpo_loss_terms(logits, reward_pred / tcfg.mse_scale, targets, lambda_high=tcfg.lambda_high,
                                     lambda_low=tcfg.lambda_low, mse_switch=tcfg.mse_switch)
            # Checked before the step: a NaN gradient would make every weight NaN, and a NaN policy writes
            # "1 1 1 ..." with no error anywhere. One device sync per micro-batch: the price of that check.
            if _any_across_ranks(not bool(torch.isfinite(m["loss"])), engine.device):
                raise NonFiniteLoss({"epoch": epoch + 1, "step": micro // gas + 1, "loss": float(m["loss"]),
                                     "ce": float(m["ce"]), "mse": float(m["mse"]), "rank": rank})
            engine.backward(loss)
            engine.step()
            for k in sums:
                sums[k] += m[k]
            micro += 1
            tokens = tokens + b["query_mask"].sum() + b["prompt_mask"].sum()
        pending.clear()
        if on_step is not None:
            on_step(epoch, micro // gas, sums["loss"] / micro)
    if micro == 0:
        raise RuntimeError(
            f"rank {rank} got no full optimizer step this epoch (fewer than micro_batch_size × "
            f"grad_accum = {tcfg.micro_batch_size} × {gas} rows in its shard)"
        )
    if on_step is not None:
        on_step(epoch, micro // gas, sums["loss"] / micro, force=True)
    elapsed = time.perf_counter() - start
    means = _mean_across_ranks({k: float(v) / micro for k, v in sums.items()}, engine.device)
    total_tokens = _sum_across_ranks(float(tokens), engine.device)
    return {**means, "steps": micro // gas, "tokens_per_s": total_tokens / max(elapsed, 1e-9),
            "epoch_time_s": elapsed}


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker function (one per rank)."""
    cfg: RunConfig = config["cfg"]
    tcfg = cfg.train
    schedule: Schedule = config["schedule"]
    base_lr, epochs = config["lr"], config["epochs"]
    if not tcfg.use_gpu:
        _use_cpu_accelerator()
    keep_freed_memory()
    import deepspeed
    import ray.train
    import torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    seed_everything(cfg.seed)  # identical initial weights on every rank
    policy = _build_policy(cfg, schedule, config["init_policy"])
    if config.get("vocab_ids") is not None:
        policy.set_vocab(config["vocab_ids"])
    policy.train()
    if tcfg.zero_stage == 3:
        # The policy reads segment embeddings by indexing `.weight` instead of calling the module; under
        # ZeRO-3 such a parameter is only gathered if registered as external to the module using it.
        deepspeed.zero.register_external_parameter(policy, policy.segment.weight)
        if policy.vocab_ids is not None:  # the prompt head reads rows of the output embedding's weight directly
            deepspeed.zero.register_external_parameter(policy, policy.base.get_output_embeddings().weight)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=base_lr, weight_decay=tcfg.weight_decay)
    gas = grad_accum_steps(tcfg, world)
    engine, _, _, _ = deepspeed.initialize(model=policy, optimizer=optimizer,
                                           config=deepspeed_config(tcfg, world))

    start_epoch, history = 0, []
    ckpt = latest_checkpoint(ray.train.get_checkpoint(), config["storage"], config["run_name"])
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = json.loads((Path(d) / EPOCH_FILE).read_text(encoding="utf-8"))
            load_path, _ = engine.load_checkpoint(d, tag=DS_TAG, load_lr_scheduler_states=False)
            if load_path is None:
                raise RuntimeError(f"DeepSpeed could not load the engine state from checkpoint {ckpt.path}")
        run = (state.get("schedule"), state.get("version"))
        if run != (schedule, config["version"]):
            # The same run name reused for another loop would silently continue the wrong training.
            raise ValueError(f"checkpoint {ckpt.path} belongs to a '{run[0]}' run on dataset v{run[1]}, "
                             f"not '{schedule}' on v{config['version']}: use a new run_name")
        start_epoch, history = int(state["epoch"]), list(state["history"])
        if rank == 0:
            log.info("qpo-ray train: resumed from epoch %d (%s)", start_epoch, ckpt.path)

    shard = ray.train.get_dataset_shard("train")
    cached = None
    if config.get("cache_rows"):
        # A shard that fits train.cache_mib is read once: every epoch after that is a permutation in memory
        # instead of a new Ray Data execution (read, tokenise, split) competing with training for the CPUs.
        from qpo_ray.train.loader import cache_shard

        t0 = time.perf_counter()
        cached = cache_shard(shard)
        if rank == 0:
            log.info("qpo-ray train: %d rows in memory (%.1f MiB), read in %.1f s", len(cached["reward"]),
                     sum(v.nbytes for v in cached.values()) / 2**20, time.perf_counter() - t0)
    poster = StepPoster(config["progress"], config["steps_per_epoch"]) if rank == 0 and config.get("progress") else None
    if config.get("fault"):  # fault-injection drills reach the workers through their config
        os.environ[FAULT_ENV] = config["fault"]
    try:
        _train_epochs(engine, optimizer, shard, cached, poster, config, cfg=cfg, schedule=schedule, base_lr=base_lr,
                      epochs=epochs, start_epoch=start_epoch, history=history, gas=gas, rank=rank, world=world)
    except NonFiniteLoss as e:
        # Every rank is here at the same step (the check is collective). Returning, not raising: Ray Train
        # would restart the workers from the last checkpoint, max_failures times, to meet the same NaN. The
        # driver finds the record and says what happened; no checkpoint of this state is reported.
        if rank == 0:
            write_stop(config["storage"], config["run_name"], config["call_id"], e.info)
            log.error("qpo-ray train: stopped: non-finite loss %s", e.info)


def _train_epochs(engine, optimizer, shard, cached, poster, config: dict[str, Any], *, cfg: RunConfig,
                  schedule: Schedule, base_lr: float, epochs: int, start_epoch: int, history: list,
                  gas: int, rank: int, world: int) -> None:
    """The epochs from ``start_epoch``: train, then report a checkpoint (the last one holds the policy)."""
    import ray.train
    import torch

    tcfg = cfg.train
    for epoch in range(start_epoch, epochs):
        lr = step_lr(base_lr, epoch, tcfg.lr_step_epochs, tcfg.lr_gamma)
        for group in optimizer.param_groups:  # the ZeRO wrappers share these group dicts
            group["lr"] = lr
        engine.train()
        # Seeded per (rank, epoch), not once per call: a run resumed at epoch k draws the dropout masks an
        # uninterrupted run would, so resuming changes no weight. Ranks differ, as in plain DDP.
        seed_everything(cfg.seed + 7919 * (rank + 1) + 104_729 * epoch)
        batches = _epoch_batches(shard, cached, epoch=epoch, tcfg=tcfg, seed=cfg.seed, rank=rank, device=engine.device)
        metrics = _run_epoch(engine, batches, epoch=epoch, tcfg=tcfg, gas=gas, rank=rank, on_step=poster)
        if epoch > start_epoch:  # a drill kills a worker that has trained on since its last restart
            fault_point(f"train.epoch-{epoch + 1}.end")
        # Read back from the engine: proves the ZeRO optimizer wrapper saw the new value.
        metrics.update(epoch=epoch + 1, lr=float(engine.get_lr()[0]), call_id=config["call_id"],
                       schedule=schedule, resumed_from_epoch=start_epoch)
        history.append(metrics)
        last = epoch + 1 == epochs
        if rank == 0:
            # A logger, not print: Train V2's patched print shows up twice in the driver's output.
            log.info("qpo-ray train: epoch %d/%d loss %.4f ce %.4f mse %.2f lr %.3g tokens/s %.0f", epoch + 1,
                     epochs, metrics["loss"], metrics["ce"], metrics["mse"], metrics["lr"],
                     metrics["tokens_per_s"])
        if last and _any_across_ranks(not _weights_finite(engine.module), engine.device):
            raise NonFiniteLoss({"epoch": epoch + 1, "step": metrics["steps"], "loss": metrics["loss"],
                                 "ce": metrics["ce"], "mse": metrics["mse"], "rank": rank, "weights": True})
        with tempfile.TemporaryDirectory(prefix="qpo-ckpt-") as tmp:
            engine.save_checkpoint(tmp, tag=DS_TAG)  # collective: each rank writes its ZeRO shard
            if last:
                _export_policy(engine, tcfg.zero_stage, Path(tmp) / POLICY_DIR, rank)
            if rank == 0:
                state = {"epoch": epoch + 1, "epochs": epochs, "schedule": schedule,
                         "version": config["version"], "history": history, "final": last}
                (Path(tmp) / EPOCH_FILE).write_text(json.dumps(state, indent=1), encoding="utf-8")
            dir_name = f"epoch-{epoch + 1:04d}"
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=dir_name)
        # report() returns once this rank's files are uploaded; after the barrier every rank's are.
        if world > 1:
            torch.distributed.barrier()
        if rank == 0:
            mark_complete(config["storage"], config["run_name"], dir_name)


__all__ = ["NonFiniteLoss", "Schedule", "deepspeed_config", "grad_accum_steps", "saved_vocab", "seed_everything",
           "step_lr", "train_loop_per_worker"]
