"""The reward-conditioned prompt policy: tokenisation, model, loss, generation, and inference (the method
that turns queries into prompts, ``inference``; what a policy folder records about it, ``served``) (docs/design.md §2).

Exports are loaded on first use: Ray Data's tokenise tasks import ``qpo_ray.policy.tokenize`` and must not
pay for torch and transformers, which the model, loss and generation modules import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qpo_ray.policy.generate import generate_prompts
    from qpo_ray.policy.inference import InferenceSettings, policy_prompts
    from qpo_ray.policy.loss import qpo_loss
    from qpo_ray.policy.model import QPOPolicy

_EXPORTS = {"QPOPolicy": "model", "generate_prompts": "generate", "qpo_loss": "loss",
            "InferenceSettings": "inference", "policy_prompts": "inference"}
__all__ = ["InferenceSettings", "QPOPolicy", "generate_prompts", "policy_prompts", "qpo_loss"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"qpo_ray.policy.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'qpo_ray.policy' has no attribute {name!r}")
