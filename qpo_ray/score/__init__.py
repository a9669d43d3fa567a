"""Stage 3 — scoring: target engines, the Ray Serve scoring pool, and the reward formulas.

- ``rewards``: raw components → raw reward (the one place the formulas live);
- ``engines``: ``TargetEngine`` and its backends (transformers, OpenAI-compatible HTTP, vLLM, replay);
- ``pool``: ``ScoringPool`` (Ray Serve replicas of an engine) and ``score_pairs`` (pairs → dataset rows);
- ``server``: an OpenAI-compatible completions server on the transformers engine (``serve-target``);
- ``cli_score``: ``qpo-ray score`` (a pairs file → a scored file).

Importing this package does not import Ray; ``pool`` and ``server`` do.
"""

from qpo_ray.score.engines import Components, ScoreRequest, TargetEngine, make_engine
from qpo_ray.score.pairs import score_pairs
from qpo_ray.score.rewards import compute_rewards, formula_for, prompt_accuracy, reward

__all__ = [
    "Components", "ScoreRequest", "TargetEngine", "compute_rewards", "formula_for", "make_engine",
    "prompt_accuracy", "reward", "score_pairs",
]
