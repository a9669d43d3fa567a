"""The QPO training loss (docs/design.md §2): prompt-token CE plus an adaptively weighted reward MSE."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F


def qpo_loss_terms(logits: torch.Tensor, reward_pred: torch.Tensor, batch: Mapping[str, Any], *,
                   lambda_high: float = 0.5, lambda_low: float = 0.1,
                   mse_switch: float = 10.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``qpo_loss`` with its metrics as detached 0-d tensors on the logits' device: no GPU→CPU sync per
    micro-batch (λ is chosen on the device too), so a training loop reads them once per epoch."""
    dev, width = logits.device, logits.shape[1]
    targets = torch.as_tensor(batch["prompt_ids"], device=dev).long()
    mask = torch.as_tensor(batch["prompt_mask"], device=dev).to(torch.float32)
    # The policy skips the batch's unused trailing pad columns; only padding may be cut here.
    if mask.shape[1] > width and bool(mask[:, width:].any()):
        raise ValueError(f"logits cover {width} prompt positions but the mask has real tokens beyond them")
    targets, mask = targets[:, :width], mask[:, :width]
    reward = torch.as_tensor(batch["reward"], device=dev).to(torch.float32).reshape(-1)

    # fp32 for the softmax: bf16 logits over a 50k vocabulary lose the small probabilities.
    tok_ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    tokens = mask.sum()
    ce = (tok_ce * mask.flatten()).sum() / tokens.clamp_min(1.0)

    mse = F.mse_loss(reward_pred.float().reshape(-1), reward)
    lam = torch.where(mse.detach() < mse_switch, lambda_high, lambda_low)
    loss = ce + lam * mse
    metrics = {"loss": loss.detach(), "ce": ce.detach(), "mse": mse.detach(), "lambda": lam, "tokens": tokens}
    return loss, metrics


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
    loss, m = qpo_loss_terms(logits, reward_pred, batch, lambda_high=lambda_high, lambda_low=lambda_low,
                             mse_switch=mse_switch)
    lam = lambda_high if bool(m["mse"] < mse_switch) else lambda_low  # the very test λ was chosen by
    return loss, {"loss": float(m["loss"]), "ce": float(m["ce"]), "mse": float(m["mse"]), "lambda": lam,
                  "tokens": float(m["tokens"])}
