"""How a trained policy turns queries into prompts: the one place that chooses the inference method.

Live and replay evaluation, ``qpo-ray generate`` and the policy service all call :func:`policy_prompts` with
an :class:`InferenceSettings`, so a served prompt is the prompt the evaluation measured:

- ``greedy``: the policy's most likely prompt at ``r = target_reward`` (beam search with ``num_beams`` > 1);
- ``best_of_n``: ``best_of_n`` prompts sampled at that reward (top-k / top-p / temperature), the one ``r̂``
  rates highest. Each query's draws are seeded from (``seed``, the query) alone, so a query gets the same
  prompt whatever batch it shares and from whichever entry point;
- ``rerank``: the candidate prompt ``r̂`` rates highest, keeping ``default_prompt`` (the best single prompt on
  train) unless another candidate beats it by more than ``margin`` (``qpo_ray.policy.generate.pick``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import TypeAdapter

if TYPE_CHECKING:
    from qpo_ray.config import RunConfig
    from qpo_ray.policy.model import QPOPolicy

Method = Literal["greedy", "best_of_n", "rerank"]
GEN_BATCH = 64  # rows per forward pass of generation: bounds a big call's memory


@dataclass(frozen=True)
class InferenceSettings:
    """What :func:`policy_prompts` needs besides the policy and the queries."""

    # No defaults: every value comes from a config (from_config) or a recorded inference.json (from_dict).
    method: Method
    target_reward: float
    num_beams: int
    best_of_n: int
    top_k: int
    top_p: float
    temperature: float
    seed: int
    candidates: tuple[str, ...] = ()  # rerank's prompts, the same for every query
    default_prompt: str | None = None  # rerank keeps it unless r̂ prefers another by more than margin
    margin: float = 0.0

    @classmethod
    def from_config(cls, cfg: RunConfig, *, candidates: Sequence[str] = (), default_prompt: str | None = None,
                    margin: float | None = None) -> InferenceSettings:
        """The settings of ``cfg``'s headline method (``eval.method``); ``margin`` None = ``eval.rerank_margin``
        (0 when it is ``fit``: a fitted margin is a number the caller passes)."""
        e, c = cfg.eval, cfg.collect
        if margin is None:
            margin = 0.0 if e.rerank_margin == "fit" else float(e.rerank_margin)
        return cls(method=e.method, target_reward=e.target_reward, num_beams=e.num_beams, best_of_n=e.best_of_n,
                   top_k=c.top_k, top_p=c.top_p, temperature=c.temperature, seed=cfg.seed,
                   candidates=tuple(candidates), default_prompt=default_prompt, margin=float(margin))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InferenceSettings:
        """Validated from JSON (types, the method's name); raises pydantic's ValidationError."""
        return _ADAPTER.validate_python(dict(data))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["candidates"] = list(self.candidates)
        return d


_ADAPTER = TypeAdapter(InferenceSettings)


def policy_prompts(policy: QPOPolicy, queries: Sequence[str], settings: InferenceSettings, *,
                   candidates: Sequence[Sequence[str]] | None = None, batch_size: int = GEN_BATCH) -> list[str]:
    """One prompt per query by ``settings.method`` (module doc).

    ``candidates`` (rerank only): one list per query instead of ``settings.candidates`` for all; replay
    evaluation ranks only the prompts recorded for each test query, the ones it can judge."""
    from qpo_ray.policy.generate import best_of_n, generate_prompts, rerank

    qs, s = list(queries), settings
    if not qs:
        return []
    if s.method == "rerank":
        cands = candidates if candidates is not None else [s.candidates] * len(qs)
        if not all(cands):
            raise ValueError("rerank needs candidate prompts for every query (settings.candidates is empty)")
        return rerank(policy, qs, cands, default=[s.default_prompt] * len(qs), margin=s.margin)
    if s.method == "best_of_n":
        # Sampling is seeded per (query, occurrence): one call per distinct query gives a repeated query
        # the prompt it gets alone.
        uniq = list(dict.fromkeys(qs))
        got = dict(zip(uniq, best_of_n(policy, uniq, s.best_of_n, target_reward=s.target_reward, top_k=s.top_k,
                                        top_p=s.top_p, temperature=s.temperature, seed=s.seed,
                                        batch_size=batch_size), strict=True))
        return [got[q] for q in qs]
    return generate_prompts(policy, qs, target_reward=s.target_reward, greedy=True, num_beams=s.num_beams,
                            batch_size=batch_size)


__all__ = ["GEN_BATCH", "InferenceSettings", "Method", "policy_prompts"]
