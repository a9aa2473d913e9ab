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
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
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


class CpuFp32Attention(AttnProcessor2_0):
    """diffusers' attention, run in fp32 on the CPU even under bf16 autocast.

    The lesson's UNet2DModel has 8 heads of dimension 8: PyTorch's CPU flash attention is slower in bf16 than
    in fp32 at that size, and attention is ~40% of a training step, so bf16 autocast of the whole network was
    slower than fp32 here; with this processor it is 1.3x faster (benchmarks/speed.py). On GPUs, bf16 attention
    is fast: there it is left to autocast.
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        # The same parameters as the parent: diffusers drops keyword arguments a processor does not name.
        inputs = (encoder_hidden_states, attention_mask, temb)
        if hidden_states.device.type != "cpu" or not torch.is_autocast_enabled("cpu"):
            return super().__call__(attn, hidden_states, *inputs)
        with torch.autocast("cpu", enabled=False):
            return super().__call__(attn, hidden_states.float(), *inputs)


class UNet2DDenoiser(nn.Module):
    def __init__(self, unet: UNet2DModel, conditioning: str = "timestep"):
        super().__init__()
        if conditioning not in CONDITIONINGS:
            raise ValueError(f"unknown conditioning {conditioning!r}; allowed: {', '.join(CONDITIONINGS)}")
        self.unet = unet
        self.conditioning = conditioning
        for module in unet.modules():
            if isinstance(module, Attention):
                module.set_processor(CpuFp32Attention())

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t: (B, C, H, W); t: (B,) timesteps (or toy amounts in [0, 1]) -> prediction (B, C, H, W)."""
        if self.conditioning == "none":
            t = torch.zeros_like(t)
        elif self.conditioning == "amount":
            t = t * 1000
        return self.unet(x_t, t).sample
