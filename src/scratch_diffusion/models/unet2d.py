"""diffusers' UNet2DModel behind the shared denoiser call `model(x_t, t) -> prediction`.

The adapter owns the timestep conditioning, so objectives and samplers pass the true t and never ask which
network or conditioning they hold:
- `timestep`: t (0..T-1) goes into the time embedding, as in DDPM;
- `none`: the embedding always sees 0 (the lesson's first UNet2DModel run: the net must infer the noise level);
- `amount`: toy corruption, t is the amount in [0, 1], embedded as amount * 1000 (the lesson's suggestion).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import UNet2DModel
from torch import nn

CONDITIONINGS = ("timestep", "none", "amount")


def build_unet(
    block_out_channels: Sequence[int] = (32, 64, 64),
    layers_per_block: int = 2,
    down_block_types: Sequence[str] = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    up_block_types: Sequence[str] = ("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    sample_size: int = 28,
    channels: int = 1,
) -> UNet2DModel:
    """The lesson's UNet2DModel by default (1,707,009 parameters)."""
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        layers_per_block=layers_per_block,
        block_out_channels=tuple(block_out_channels),
        down_block_types=tuple(down_block_types),
        up_block_types=tuple(up_block_types),
    )


class UNet2DDenoiser(nn.Module):
    def __init__(self, unet: UNet2DModel, conditioning: str = "timestep"):
        super().__init__()
        if conditioning not in CONDITIONINGS:
            raise ValueError(f"unknown conditioning {conditioning!r}; allowed: {', '.join(CONDITIONINGS)}")
        self.unet = unet
        self.conditioning = conditioning

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t: (B, C, H, W); t: (B,) timesteps (or toy amounts in [0, 1]) -> prediction (B, C, H, W)."""
        if self.conditioning == "none":
            t = torch.zeros_like(t)
        elif self.conditioning == "amount":
            t = t * 1000
        return self.unet(x_t, t).sample
