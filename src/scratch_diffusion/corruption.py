"""Forward (corruption) processes. Data ranges differ: the toy process lives in [0, 1]."""

from __future__ import annotations

import torch


def corrupt(x: torch.Tensor, amount: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
    """The lesson's toy corruption: mix x (B, C, H, W) in [0, 1] with uniform noise by `amount` (B,) in [0, 1].

    x_t = x * (1 - amount) + U(0, 1) * amount. amount=0 keeps x, amount=1 is pure
    noise; the result stays in [0, 1].
    """
    if noise is None:
        noise = torch.rand_like(x)
    amount = amount.view(-1, *([1] * (x.ndim - 1)))  # (B,) -> (B, 1, 1, 1) to broadcast per image
    return x * (1 - amount) + noise * amount
