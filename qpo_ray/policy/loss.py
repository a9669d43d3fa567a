"""The QPO training loss (DESIGN §2): prompt-token CE plus an adaptively weighted reward MSE."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F


def qpo_loss(logits: torch.Tensor, reward_pred: torch.Tensor, batch: Mapping[str, Any], *,
             lambda_high: float = 0.5, lambda_low: float = 0.1,
             mse_switch: float = 10.0) -> tuple[torch.Tensor, dict[str, float]]:
    """``L = CE(prompt tokens) + λ·MSE(r̂, r)``.

    ``logits`` ``[B, T, V]`` predict the first ``T`` columns of ``batch["prompt_ids"]`` (``[B, Lp+1]``; the
    columns past ``T`` must be padding); CE is averaged over the tokens where
    ``batch["prompt_mask"]`` is 1 (pads carry no loss). ``λ = lambda_high`` when the batch MSE is below
    ``mse_switch``, else ``lambda_low`` — the reference's switch, decided on the detached value so it
    is not itself differentiated. Returns the loss and float metrics
    ``{loss, ce, mse, lambda, tokens}``.
    """
    dev, width = logits.device, logits.shape[1]
    targets = torch.as_tensor(batch["prompt_ids"], device=dev).long()
    mask = torch.as_tensor(batch["prompt_mask"], device=dev).to(torch.float32)
    # The policy skips the batch's unused trailing pad columns; only padding may be cut here.
    if bool(mask[:, width:].any()):
        raise ValueError(f"logits cover {width} prompt positions but the mask has real tokens beyond them")
    targets, mask = targets[:, :width], mask[:, :width]
    reward = torch.as_tensor(batch["reward"], device=dev).to(torch.float32).reshape(-1)

    # fp32 for the softmax: bf16 logits over a 50k vocabulary lose the small probabilities.
    tok_ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    tokens = mask.sum()
    ce = (tok_ce * mask.flatten()).sum() / tokens.clamp_min(1.0)

    mse = F.mse_loss(reward_pred.float().reshape(-1), reward)
    lam = lambda_high if mse.detach().item() < mse_switch else lambda_low
    loss = ce + lam * mse
    metrics = {"loss": loss.detach().item(), "ce": ce.detach().item(), "mse": mse.detach().item(),
               "lambda": float(lam), "tokens": tokens.item()}
    return loss, metrics
