"""Policy training: Ray Train (V2) ``TorchTrainer`` workers running a DeepSpeed engine (docs/design.md §2, §5).

Driver side, ``train_policy`` builds the streaming dataset, launches the trainer and copies the exported
policy out of the final checkpoint. Worker side, ``train_loop_per_worker`` runs one DeepSpeed engine per
rank (ZeRO stage 0–3), reports a checkpoint at every epoch end and resumes from ``get_checkpoint()``.

The worker side lives in ``qpo_ray.train.worker``, the checkpoint layout in ``qpo_ray.train.checkpoints``.
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qpo_ray.atomic import atomic_write_json
from qpo_ray.config import RunConfig, TrainConfig
from qpo_ray.data.store import DatasetStore
from qpo_ray.errors import DataError, TrainingError
from qpo_ray.faults import FAULT_ENV
from qpo_ray.stopping import keep_signal_handlers, stopping_signals
from qpo_ray.train.checkpoints import (
    EPOCH_FILE,
    copy_policy_out,
    latest_checkpoint,
    read_checkpoint_json,
    read_stop,
)
from qpo_ray.train.step_relay import training_progress
from qpo_ray.train.worker import Schedule, grad_accum_steps, saved_vocab, train_loop_per_worker

log = logging.getLogger(__name__)


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


def storage_path(cfg: RunConfig) -> str:
    """Where Ray Train keeps checkpoints: ``train.storage_path`` or ``<run_dir>/train``. A relative local path
    is relative to the run directory, so a moved run finds its checkpoints; it is made absolute (Ray Train
    requires it). URIs (``s3://``, ``gs://``, ...) pass through."""
    path = cfg.train.storage_path or "train"
    if "://" in path:
        return path
    local = Path(path).expanduser()
    return str((local if local.is_absolute() else Path(cfg.run_dir) / local).resolve())


def steps_per_epoch(tcfg: TrainConfig, rows: int, what: str, rows_note: str = "") -> int:
    """Optimizer steps in one epoch over ``rows`` rows (each worker gets an equal share, a partial batch is
    dropped). Raises DataError, one line naming ``what``, the numbers and the knobs, when that is not one step."""
    steps = rows // tcfg.num_workers // tcfg.micro_batch_size // grad_accum_steps(tcfg, tcfg.num_workers)
    if steps < 1:
        raise DataError(f"{what} has {rows} rows{rows_note}: too few for one optimizer step (train.batch_size="
                        f"{tcfg.batch_size} rows across {tcfg.num_workers} worker(s)); add rows or lower "
                        "train.batch_size")
    return steps


def check_trainable(cfg: RunConfig, store: DatasetStore, version: int) -> int:
    """Verify dataset ``version`` (files, content, every row) and that it holds at least one optimizer step;
    returns its steps per epoch. Raises DataError; needs no Ray, so it can run before Ray starts."""
    return steps_per_epoch(cfg.train, store.verify(version).rows, f"dataset v{version:03d} in {store.root}")


def train_policy(cfg: RunConfig, *, store: DatasetStore, version: int, out_dir: Path, schedule: Schedule,
                 init_policy: Path | None = None, run_name: str, progress: bool = True) -> TrainResult:
    """Train the policy on dataset ``version`` and export it to ``out_dir``.

    ``schedule="scratch"`` starts from the pretrained LM with ``train.scratch``; ``"finetune"`` continues
    ``init_policy`` with ``train.finetune``. Calling again with the same ``run_name`` and storage resumes
    from the run's latest checkpoint (Ray Train V2 restores its checkpoint manager from storage), so an
    interrupted call only trains the missing epochs. ``progress`` shows steps, loss and ETA on stderr.
    """

    from qpo_ray.policy.model import CANDIDATES
    from qpo_ray.pretrained import load_tokenizer
    from qpo_ray.train.loader import plan_prompts, row_bytes, training_dataset

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
                        cfg.policy, base_vocab=saved_vocab(init) if init is not None else None,
                        query_means=tcfg.reward_target == "advantage")
    rows = plan.rows
    steps = steps_per_epoch(tcfg, rows, f"dataset v{version:03d} in {store.root}",
                            f" whose prompt fits policy.max_prompt_tokens={cfg.policy.max_prompt_tokens}")
    ds = training_dataset(store, version, cfg.policy, tokenizer=tok, seed=cfg.seed,
                          tokenize_tasks=tcfg.num_workers, query_means=plan.query_means)
    call_id = uuid.uuid4().hex
    storage = storage_path(cfg)
    shard_mib = rows / tcfg.num_workers * row_bytes(cfg.policy) / 2**20
    cache = sched.epochs > 1 and shard_mib <= tcfg.cache_mib
    log.info("training %s on v%03d (%d rows, %d steps/epoch, %d epochs, ZeRO-%d, %d worker(s)), run '%s'; "
             "%s", schedule, version, rows, steps, sched.epochs, tcfg.zero_stage, tcfg.num_workers, run_name,
             f"each worker holds its ~{shard_mib:.1f} MiB shard in memory after one pass" if cache else
             f"streamed every epoch (a ~{shard_mib:.1f} MiB shard, train.cache_mib={tcfg.cache_mib})")
    with training_progress(f"train {schedule} v{version:03d}", epochs=sched.epochs, steps_per_epoch=steps,
                           enabled=progress) as board:
        result = _fit(cfg, ds, run_name=run_name, storage=storage, config={
            "cfg": cfg, "schedule": schedule, "lr": sched.lr, "epochs": sched.epochs, "init_policy": init,
            "call_id": call_id, "version": version, "vocab_ids": plan.vocab_ids, "storage": storage,
            "run_name": run_name, "fault": os.environ.get(FAULT_ENV), "progress": board,
            "steps_per_epoch": steps, "cache_rows": cache})
    stopped = read_stop(storage, run_name, call_id)
    if stopped is not None:
        what = "a weight" if stopped.get("weights") else f"the loss ({stopped['loss']})"
        raise TrainingError(
            f"training stopped at epoch {stopped['epoch']}, step {stopped['step']} of run '{run_name}' on dataset "
            f"v{version:03d}: {what} is not a finite number (ce {stopped['ce']}, reward mse {stopped['mse']}); no "
            f"policy written. Check the rewards' range or lower train.{schedule}.lr ({sched.lr:g})")
    # A worker orphaned by a killed driver may have finished the run, so this call trained nothing and
    # Ray Train registered nothing new: the newest complete checkpoint in storage is the result.
    ckpt = latest_checkpoint(result.checkpoint, storage, run_name)
    if ckpt is None:
        raise RuntimeError(f"training run '{run_name}' finished without a checkpoint")
    state = read_checkpoint_json(ckpt, EPOCH_FILE)
    if not state.get("final") or state["epoch"] < sched.epochs:
        raise RuntimeError(f"run '{run_name}': the latest checkpoint is epoch {state['epoch']} of "
                           f"{state.get('epochs')}, not a final one for {sched.epochs} epochs")
    copy_policy_out(ckpt, Path(out_dir))
    # The prompts it was trained on travel with the policy: rerank's candidates when it is served before an
    # evaluation recorded its pool (inference.json).
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

    class Trainer(TorchTrainer):
        def _register_sigint_handler(self, controller):
            # Ray Train sets a SIGINT handler of its own in fit() (abort the training, return) and leaves it
            # set: inside a run that stops on signals (qpo_ray.stopping), Ctrl-C must stop the run instead.
            if not stopping_signals():
                super()._register_sigint_handler(controller)

    tcfg = cfg.train
    trainer = Trainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(num_workers=tcfg.num_workers, use_gpu=tcfg.use_gpu,
                                               resources_per_worker={"CPU": tcfg.cpus_per_worker},
                                               placement_strategy=tcfg.placement_strategy),
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
    with keep_signal_handlers():
        return trainer.fit()


__all__ = ["TrainResult", "check_trainable", "steps_per_epoch", "storage_path", "train_policy"]
