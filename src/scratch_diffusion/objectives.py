"""Training objectives: what the network predicts and the loss on it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from scratch_diffusion.corruption import corrupt


def toy_loss(model, x0: torch.Tensor) -> torch.Tensor:
    """The lesson's objective: corrupt x0 (in [0, 1]) by amount ~ U(0, 1) per image, predict x0, MSE."""
    amount = torch.rand(x0.shape[0], device=x0.device)
    x_t = corrupt(x0, amount)
    return F.mse_loss(model(x_t, amount), x0)
