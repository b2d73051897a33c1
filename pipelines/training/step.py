"""The one optimisation step every trainer uses: the training loop (pipelines/training/loop.py) and
anything that trains a helper model in memory (the held-out-class anomaly check). One AdamW per
optimizer group the model declares (`param_groups()`), the total of the losses it names
(`optimizer_losses`), gradients clipped per group. Not here: data, schedules, checkpoints, Ray.
"""
from __future__ import annotations

import torch

from vaemodels import AutoEncoderModel


def make_optimizers(model: AutoEncoderModel, lr: float, weight_decay: float) -> dict[str, torch.optim.Optimizer]:
    return {group: torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
            for group, params in model.param_groups().items()}


def set_lr(optimizers: dict[str, torch.optim.Optimizer], lr: float) -> None:
    for opt in optimizers.values():
        for group in opt.param_groups:
            group["lr"] = lr


def total_loss(model: AutoEncoderModel, out: dict[str, torch.Tensor]) -> torch.Tensor:
    """What backward() runs on: the sum of the losses the model's optimizers minimise."""
    return sum(out[key] for key in model.optimizer_losses.values())


def update(model: AutoEncoderModel, optimizers: dict[str, torch.optim.Optimizer], total: torch.Tensor,
           grad_clip: float | None) -> None:
    """Backpropagate `total` and step every optimizer, its group's gradient norm clipped to `grad_clip`."""
    for opt in optimizers.values():
        opt.zero_grad(set_to_none=True)
    total.backward()
    for group, params in model.param_groups().items():
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizers[group].step()
