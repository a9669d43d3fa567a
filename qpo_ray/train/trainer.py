"""Policy training: Ray Train (V2) ``TorchTrainer`` workers running a DeepSpeed engine (DESIGN §2, §3).

Driver side, ``train_policy`` builds the streaming dataset, launches the trainer and copies the exported
policy out of the final checkpoint. Worker side, ``train_loop_per_worker`` runs one DeepSpeed engine per
rank (ZeRO stage 0–3), reports a checkpoint at every epoch end and resumes from ``get_checkpoint()``.

A checkpoint directory (one per epoch, ``epoch-NNNN``) holds::

    epoch.json   completed epochs + the metrics history (rank 0)
    latest       DeepSpeed's tag pointer
    state/       DeepSpeed engine state: model states (rank 0) and one ZeRO shard file per rank
    policy/      the full policy in QPOPolicy.save format (last epoch only)

Ray Train merges the per-rank directories of a report into that one folder in storage.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from qpo_ray.atomic import atomic_write_json
from qpo_ray.config import RunConfig, TrainConfig
from qpo_ray.data.store import DatasetStore
from qpo_ray.errors import DataError
from qpo_ray.runs import FAULT_ENV, fault_point
from qpo_ray.train.progress import StepPoster, training_progress

log = logging.getLogger(__name__)

Schedule = Literal["scratch", "finetune"]
EPOCH_FILE = "epoch.json"
POLICY_DIR = "policy"
# ``<storage>/<run>/.complete/epoch-NNNN``: written by rank 0 once every rank has uploaded that checkpoint.
# A worker that dies soon after reporting can die before Ray Train's controller has registered the report;
# the restarted worker group then gets no (or an older) checkpoint from ``get_checkpoint()``. The markers
# let it find the newest complete checkpoint in storage itself.
COMPLETE_DIR = ".complete"
DS_TAG = "state"  # one DeepSpeed tag per checkpoint folder: each epoch gets its own folder anyway


@dataclass
class TrainResult:
    """What one ``train_policy`` call produced."""

    policy_dir: Path  # the exported policy (QPOPolicy.load-able)
    metrics: dict[str, Any]  # the final epoch's metrics
    epochs_run: int  # epochs trained by this call (0 when the run was already complete)
    resumed_from_epoch: int | None  # completed epochs found in a checkpoint at the start; None = fresh
    history: list[dict[str, Any]] = field(default_factory=list)  # every epoch of the run, resumed ones too
    checkpoint_path: str = ""  # the final Ray Train checkpoint (storage URI or path)

    @property
    def epoch_metrics(self) -> list[dict[str, Any]]:
        """Only the epochs this call trained (what a caller appends to its metrics log)."""
        return self.history[len(self.history) - self.epochs_run:] if self.epochs_run else []


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


def _seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


# -- worker side ----------------------------------------------------------------------------------------
def _use_cpu_accelerator() -> None:
    """DeepSpeed picks its accelerator at first use; pin it to CPU before anything asks for it."""
    os.environ["DS_ACCELERATOR"] = "cpu"
    # DeepSpeed JIT-compiles its CPU shm op with whichever `ninja` is first on PATH. Two ninja versions
    # (this environment's and the system's) hash build commands differently, so alternating between them
    # recompiled the op (1–4 CPU-minutes) on every training start. Always use this environment's.
    env_bin = os.path.dirname(sys.executable)
    if os.path.isfile(os.path.join(env_bin, "ninja")) and not os.environ.get("PATH", "").startswith(env_bin + os.pathsep):
        os.environ["PATH"] = env_bin + os.pathsep + os.environ.get("PATH", "")
    from deepspeed.accelerator import get_accelerator, set_accelerator
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    if get_accelerator().device_name() != "cpu":  # imported earlier in this process with another choice
        set_accelerator(CPU_Accelerator())


def _saved_vocab(policy_dir: str) -> list[int] | None:
    """The prompt vocabulary a saved policy was trained with (None: the whole vocabulary)."""
    from qpo_ray.policy.model import POLICY_CONFIG

    return json.loads((Path(policy_dir) / POLICY_CONFIG).read_text(encoding="utf-8")).get("vocab_ids")


def _build_policy(cfg: RunConfig, schedule: Schedule, init_policy: str | None):
    from qpo_ray.policy.model import QPOPolicy

    if schedule == "finetune":
        return QPOPolicy.load(init_policy)
    return QPOPolicy.from_config(cfg.policy, seed=cfg.train.seed)


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


def _run_epoch(engine, shard, *, epoch: int, tcfg: TrainConfig, gas: int, rank: int,
               on_step: Callable[..., None] | None = None) -> dict[str, float]:
    """One pass over this rank's shard. Micro-batches are applied in groups of ``gas`` so every optimizer
    step sees a full accumulation window; a trailing partial window is dropped (identically on every rank,
    since the shards are equal) instead of leaking its gradients into the next epoch."""
    from qpo_ray.policy.loss import qpo_loss
    from qpo_ray.train.loader import train_batches

    sums = {"loss": 0.0, "ce": 0.0, "mse": 0.0, "lambda": 0.0}
    micro, tokens, pending = 0, 0.0, []
    start = time.perf_counter()
    batches = train_batches(shard, tcfg.micro_batch_size, tcfg.seed * 1_000_003 + epoch * 1009 + rank)
    for batch in batches:
        pending.append(batch)
        if len(pending) < gas:
            continue
        for b in pending:
            logits, reward_pred = engine(query_ids=b["query_ids"], query_mask=b["query_mask"],
                                         prompt_ids=b["prompt_ids"], prompt_mask=b["prompt_mask"],
                                         reward=b["reward"])
            targets = dict(b, prompt_ids=engine.module.head_targets(b["prompt_ids"], b["prompt_mask"]),
                           reward=b["reward_target"] / tcfg.mse_scale)
            loss, m = qpo_loss(logits, reward_pred / tcfg.mse_scale, targets, lambda_high=tcfg.lambda_high,
                               lambda_low=tcfg.lambda_low, mse_switch=tcfg.mse_switch)
            engine.backward(loss)
            engine.step()
            for k in sums:
                sums[k] += m[k]
            micro += 1
            tokens += float(b["query_mask"].sum() + b["prompt_mask"].sum())
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
    means = _mean_across_ranks({k: v / micro for k, v in sums.items()}, engine.device)
    total_tokens = _sum_across_ranks(tokens, engine.device)
    return {**means, "steps": micro // gas, "tokens_per_s": total_tokens / max(elapsed, 1e-9),
            "epoch_time_s": elapsed}


def _checkpoint_epoch(path: str) -> int:
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return int(name.split("-", 1)[1]) if name.startswith("epoch-") and name[6:].isdigit() else -1


def newest_complete_checkpoint(storage: str, run_name: str):
    """The newest checkpoint of run ``run_name`` that every rank finished uploading (its marker exists and
    its folder still holds ``epoch.json``), as a ``ray.train.Checkpoint``; None when there is none."""
    import pyarrow.fs as pafs
    import ray.train

    fs, root = pafs.FileSystem.from_uri(storage)
    run = f"{root.rstrip('/')}/{run_name}"
    markers = fs.get_file_info(pafs.FileSelector(f"{run}/{COMPLETE_DIR}", allow_not_found=True))
    for name in sorted((m.base_name for m in markers), key=_checkpoint_epoch, reverse=True):
        if _checkpoint_epoch(name) > 0 and fs.get_file_info(f"{run}/{name}/{EPOCH_FILE}").type == pafs.FileType.File:
            return ray.train.Checkpoint(path=f"{run}/{name}", filesystem=fs)
    return None


def _mark_complete(storage: str, run_name: str, dir_name: str) -> None:
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(storage)
    folder = f"{root.rstrip('/')}/{run_name}/{COMPLETE_DIR}"
    fs.create_dir(folder, recursive=True)
    with fs.open_output_stream(f"{folder}/{dir_name}") as f:
        f.write(b"")


def latest_checkpoint(registered, storage: str, run_name: str):
    """Ray Train's latest registered checkpoint, or a newer complete one in storage (written by a worker
    whose controller died before registering it, e.g. with a killed driver); None when there is neither."""
    found = newest_complete_checkpoint(storage, run_name)
    if found is None or (registered is not None and _checkpoint_epoch(registered.path) >= _checkpoint_epoch(found.path)):
        return registered
    log.info("qpo-ray train: using %s, newer than Ray Train's latest registered checkpoint (%s)",
             found.path, registered.path if registered is not None else "none")
    return found


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker function (one per rank)."""
    cfg: RunConfig = config["cfg"]
    tcfg = cfg.train
    schedule: Schedule = config["schedule"]
    base_lr, epochs = config["lr"], config["epochs"]
    if not tcfg.use_gpu:
        _use_cpu_accelerator()
    import deepspeed
    import ray.train
    import torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    _seed_everything(tcfg.seed)  # identical initial weights on every rank
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
    poster = StepPoster(config["progress"], config["steps_per_epoch"]) if rank == 0 and config.get("progress") else None
    if config.get("fault"):  # fault-injection drills reach the workers through their config
        os.environ[FAULT_ENV] = config["fault"]
    for epoch in range(start_epoch, epochs):
        lr = step_lr(base_lr, epoch, tcfg.lr_step_epochs, tcfg.lr_gamma)
        for group in optimizer.param_groups:  # the ZeRO wrappers share these group dicts
            group["lr"] = lr
        engine.train()
        # Seeded per (rank, epoch), not once per call: a run resumed at epoch k draws the dropout masks an
        # uninterrupted run would, so resuming changes no weight. Ranks differ, as in plain DDP.
        _seed_everything(tcfg.seed + 7919 * (rank + 1) + 104_729 * epoch)
        metrics = _run_epoch(engine, shard, epoch=epoch, tcfg=tcfg, gas=gas, rank=rank, on_step=poster)
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
            _mark_complete(config["storage"], config["run_name"], dir_name)


# -- driver side ----------------------------------------------------------------------------------------
def _read_json(checkpoint, name: str) -> dict[str, Any]:
    """A small file from a checkpoint, through its own filesystem (works for local, NFS, s3://, gs://)."""
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{name}") as f:
        return json.loads(f.read().decode("utf-8"))


def _copy_policy_out(checkpoint, out_dir: Path) -> None:
    """Copy ``policy/`` from the checkpoint to ``out_dir`` (atomically replaced), without downloading the
    optimizer shards."""
    import pyarrow.fs as pafs

    out_dir = out_dir.resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".tmp-{out_dir.name}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        pafs.copy_files(f"{checkpoint.path}/{POLICY_DIR}", str(tmp), source_filesystem=checkpoint.filesystem,
                        destination_filesystem=pafs.LocalFileSystem())
        old = None
        if out_dir.exists():
            old = out_dir.parent / f".old-{out_dir.name}-{uuid.uuid4().hex[:8]}"
            os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def storage_path(cfg: RunConfig) -> str:
    """Where Ray Train keeps checkpoints: ``train.storage_path`` or ``<run_dir>/train``. A relative local path
    is relative to the run directory, so a moved run finds its checkpoints; it is made absolute (Ray Train
    requires it). URIs (``s3://``, ``gs://``, ...) pass through."""
    path = cfg.train.storage_path or "train"
    if "://" in path:
        return path
    local = Path(path).expanduser()
    return str((local if local.is_absolute() else Path(cfg.run_dir) / local).resolve())


def check_trainable(cfg: RunConfig, store: DatasetStore, version: int) -> int:
    """Verify dataset ``version`` (files, content, every row) and that it holds at least one optimizer step
    (``train.batch_size`` rows); returns its row count. Raises DataError; needs no Ray, so it can run before
    Ray starts."""
    rows = store.verify(version).rows
    tcfg = cfg.train
    if rows < tcfg.batch_size:
        raise DataError(f"dataset v{version:03d} in {store.root} has {rows} rows: too few for one optimizer step "
                        f"(train.batch_size={tcfg.batch_size} rows across {tcfg.num_workers} worker(s))")
    return rows


def train_policy(cfg: RunConfig, *, store: DatasetStore, version: int, out_dir: Path, schedule: Schedule,
                 init_policy: Path | None = None, run_name: str, progress: bool = True) -> TrainResult:
    """Train the policy on dataset ``version`` and export it to ``out_dir``.

    ``schedule="scratch"`` starts from the pretrained LM with ``train.scratch``; ``"finetune"`` continues
    ``init_policy`` with ``train.finetune``. Calling again with the same ``run_name`` and storage resumes
    from the run's latest checkpoint (Ray Train V2 restores its checkpoint manager from storage), so an
    interrupted call only trains the missing epochs. ``progress`` shows steps, loss and ETA on stderr.
    """

    from qpo_ray.models import load_tokenizer
    from qpo_ray.policy.model import CANDIDATES
    from qpo_ray.train.loader import plan_prompts, training_dataset

    if schedule not in ("scratch", "finetune"):
        raise ValueError(f"schedule must be 'scratch' or 'finetune', not {schedule!r}")
    if schedule == "finetune" and init_policy is None:
        raise ValueError("schedule 'finetune' needs init_policy (the previous loop's policy folder)")
    tcfg = cfg.train
    sched = tcfg.scratch if schedule == "scratch" else tcfg.finetune
    check_trainable(cfg, store, version)
    if not tcfg.use_gpu and tcfg.precision != "fp32":
        log.warning("train.precision=%s needs a GPU; training in fp32 on CPU", tcfg.precision)

    init = str(Path(init_policy).resolve()) if init_policy is not None else None
    # A fine-tuned policy keeps the tokenizer it was saved with.
    tok = init if init is not None and (Path(init) / "tokenizer_config.json").exists() else None
    plan = plan_prompts(store, version, load_tokenizer(tok or cfg.policy.tokenizer, tok or cfg.policy.model),
                        cfg.policy, base_vocab=_saved_vocab(init) if init is not None else None,
                        query_means=tcfg.reward_target == "advantage")
    rows = plan.rows
    if rows < tcfg.batch_size:
        raise DataError(f"dataset v{version:03d} has {rows} rows whose prompt fits policy.max_prompt_tokens="
                        f"{cfg.policy.max_prompt_tokens}: too few for one optimizer step (train.batch_size="
                        f"{tcfg.batch_size})")
    steps = (rows // tcfg.num_workers // tcfg.micro_batch_size) // grad_accum_steps(tcfg, tcfg.num_workers)
    ds = training_dataset(store, version, cfg.policy, tokenizer=tok, seed=tcfg.seed,
                          tokenize_tasks=tcfg.num_workers, query_means=plan.query_means)
    call_id = uuid.uuid4().hex
    storage = storage_path(cfg)
    log.info("training %s on v%03d (%d rows, %d steps/epoch, %d epochs, ZeRO-%d, %d worker(s)), run '%s'",
             schedule, version, rows, steps, sched.epochs, tcfg.zero_stage, tcfg.num_workers, run_name)
    with training_progress(f"train {schedule} v{version:03d}", epochs=sched.epochs, steps_per_epoch=steps,
                           enabled=progress) as board:
        result = _fit(cfg, ds, run_name=run_name, storage=storage, config={
            "cfg": cfg, "schedule": schedule, "lr": sched.lr, "epochs": sched.epochs, "init_policy": init,
            "call_id": call_id, "version": version, "vocab_ids": plan.vocab_ids, "storage": storage,
            "run_name": run_name, "fault": os.environ.get(FAULT_ENV), "progress": board,
            "steps_per_epoch": steps})
    # A worker orphaned by a killed driver may have finished the run, so this call trained nothing and
    # Ray Train registered nothing new: the newest complete checkpoint in storage is the result.
    ckpt = latest_checkpoint(result.checkpoint, storage, run_name)
    if ckpt is None:
        raise RuntimeError(f"training run '{run_name}' finished without a checkpoint")
    state = _read_json(ckpt, EPOCH_FILE)
    if not state.get("final") or state["epoch"] < sched.epochs:
        raise RuntimeError(f"run '{run_name}': the latest checkpoint is epoch {state['epoch']} of "
                           f"{state.get('epochs')}, not a final one for {sched.epochs} epochs")
    _copy_policy_out(ckpt, Path(out_dir))
    # The prompts it was trained on travel with the policy: the policy service reranks them (eval.method).
    atomic_write_json(Path(out_dir) / CANDIDATES, plan.prompts)
    history = state["history"]
    ours = [i for i, h in enumerate(history) if h.get("call_id") == call_id]
    epochs_run = len(ours)
    start = history[ours[0]]["epoch"] - 1 if ours else state["epoch"]
    return TrainResult(
        policy_dir=Path(out_dir).resolve(),
        metrics=history[-1] if history else dict(result.metrics or {}),
        epochs_run=epochs_run,
        resumed_from_epoch=start if start > 0 else None,
        history=history,
        checkpoint_path=ckpt.path,
    )


def _fit(cfg: RunConfig, ds, *, run_name: str, storage: str, config: dict[str, Any]):
    import ray.train
    from ray.train.torch import TorchTrainer

    tcfg = cfg.train
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(num_workers=tcfg.num_workers, use_gpu=tcfg.use_gpu,
                                               resources_per_worker={"CPU": tcfg.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=tcfg.max_failures),
            # Keep the last two: the latest to resume/export from, one more in case it is half-written.
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
        # The default DataConfig splits "train" with streaming_split(num_workers, equal=True): equal row
        # counts per rank, so with drop_last every rank runs the same number of steps.
        datasets={"train": ds},
    )
    return trainer.fit()
