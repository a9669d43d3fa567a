"""The reward-conditioned prompt policy: tokenisation, model, loss and generation (DESIGN §2)."""

from qpo_ray.policy.generate import generate_prompts
from qpo_ray.policy.loss import qpo_loss
from qpo_ray.policy.model import QPOPolicy

__all__ = ["QPOPolicy", "generate_prompts", "qpo_loss"]
