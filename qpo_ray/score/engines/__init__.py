"""Target engines: one interface (``base.TargetEngine``), one short file per backend, and a factory."""

from __future__ import annotations

from collections.abc import Iterable

from qpo_ray.config import TargetConfig
from qpo_ray.errors import TargetError
from qpo_ray.score.engines.base import Components, ScoreRequest, TargetEngine
from qpo_ray.tasks import Task

ENGINES = ("transformers", "openai", "vllm", "replay")


def target_precision(cfg: TargetConfig) -> str:
    """The precision that scores a run, as the report states it (greedy math answers can differ by it)."""
    if cfg.engine == "transformers":
        return "float32" if cfg.dtype == "auto" else cfg.dtype
    if cfg.engine == "vllm":
        return cfg.dtype if cfg.dtype != "auto" else "auto (vLLM: the checkpoint's dtype; float32 ones in 16 bits)"
    if cfg.engine == "openai":
        return f"whatever the server at {cfg.base_url} runs"
    return "as recorded (replay)"


def make_engine(cfg: TargetConfig, task: Task | Iterable[Task] | None = None) -> TargetEngine:
    """The engine named by ``cfg.engine``, able to score requests of the given task(s)."""
    if cfg.engine == "transformers":
        from qpo_ray.score.engines.transformers_engine import TransformersEngine

        return TransformersEngine(cfg, task)
    if cfg.engine == "openai":
        from qpo_ray.score.engines.openai_engine import OpenAIEngine

        return OpenAIEngine(cfg, task)
    if cfg.engine == "vllm":
        from qpo_ray.score.engines.vllm_engine import VLLMEngine

        return VLLMEngine(cfg, task)
    if cfg.engine == "replay":
        from qpo_ray.score.engines.replay_engine import ReplayEngine

        return ReplayEngine(cfg, task)
    raise TargetError(f"unknown target.engine '{cfg.engine}' (one of {', '.join(ENGINES)})")


__all__ = ["ENGINES", "Components", "ScoreRequest", "TargetEngine", "make_engine", "target_precision"]
