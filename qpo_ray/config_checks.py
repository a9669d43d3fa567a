"""Rules across the sections of a configuration, checked when it loads, before any work."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qpo_ray.config import RunConfig, TargetConfig


def config_problems(cfg: RunConfig) -> list[str]:
    """What makes sections of a config contradict each other (empty when they agree)."""
    t, e, p, c = cfg.train, cfg.eval, cfg.policy, cfg.collect
    out = []
    if t.batch_size % (t.micro_batch_size * t.num_workers):
        out.append(f"train.batch_size ({t.batch_size}) must be a multiple of train.micro_batch_size × "
                   f"train.num_workers ({t.micro_batch_size} × {t.num_workers})")
    needs_head = e.method in ("best_of_n", "rerank") or e.best_of_n > 1
    if needs_head and p.reward_head != "last_prompt":
        out.append(f"eval.method={e.method!r} / eval.best_of_n={e.best_of_n} rank prompts with r̂(q, p), which "
                   "needs policy.reward_head='last_prompt'")
    if t.reward_target == "advantage" and p.reward_head != "last_prompt":
        out.append("train.reward_target='advantage' is for policy.reward_head='last_prompt' (the 'reward_slot' "
                   "head reads the conditioning reward itself)")
    if c.scored_per_query > c.num_candidates:
        out.append(f"collect.scored_per_query ({c.scored_per_query}) must not exceed collect.num_candidates "
                   f"({c.num_candidates}): r̂ screens the candidates")
    if e.method == "best_of_n" and e.best_of_n < 2:
        out.append("eval.method='best_of_n' needs eval.best_of_n >= 2")
    return out + device_problems(cfg)


def target_replicas(t: TargetConfig) -> int:
    """Replicas the scoring pool starts with (autoscaling: its floor)."""
    if not t.autoscaling:
        return t.num_replicas
    return max(int(t.autoscaling.get("min_replicas", 1) or 1), int(t.autoscaling.get("initial_replicas", 0) or 0))


def device_problems(cfg: RunConfig) -> list[str]:
    """What makes a config's devices and batch sizes contradict each other: every GPU a section reserves is
    used by its model, no model asks for a GPU it did not reserve, and the pool keeps every replica's batch
    full. Checked when the config loads, before any work."""
    t = cfg.target
    out = []
    full = target_replicas(t) * t.max_batch_size
    if t.engine != "replay" and t.max_in_flight < full:
        out.append(f"target.max_in_flight ({t.max_in_flight}) must be at least replicas × target.max_batch_size "
                   f"({target_replicas(t)} × {t.max_batch_size} = {full}): fewer requests in flight never fill "
                   "a replica's batch")
    if t.engine == "vllm" and t.num_gpus_per_replica <= 0:
        out.append("target.engine='vllm' runs on a GPU: set target.num_gpus_per_replica (e.g. 1)")
    if t.engine == "transformers":
        on_gpu = t.device.startswith("cuda")
        if t.num_gpus_per_replica > 0 and not (on_gpu or t.device == "auto"):
            out.append(f"target.num_gpus_per_replica={t.num_gpus_per_replica:g} reserves a GPU the model would "
                       f"not use (target.device={t.device!r}): set target.device=cuda")
        if on_gpu and t.num_gpus_per_replica <= 0:
            out.append(f"target.device={t.device!r} needs a GPU per replica: set target.num_gpus_per_replica")
    return out
