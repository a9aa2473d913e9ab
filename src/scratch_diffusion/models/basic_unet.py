"""The lesson's hand-written BasicUNet ("Diffusion Models from Scratch", Unit 1 of the HF diffusion course).

Three 5x5 conv layers down (C -> 32 -> 64 -> 64) with max-pooling, three up (64 -> 64 -> 32 -> C) with nearest
upsampling and additive skips, SiLU after every conv (the last one too, as in the lesson): 309,057 parameters for
one channel (MNIST), 312,259 for three (RGB). It is not conditioned on the noise level: it sees only x_t and must
guess how corrupted it is.
"""

from __future__ import annotations

import torch
from torch import nn


class BasicUNet(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, sample_size: int):
        """Shaped for the dataset's images (the training recipe and the model folder pass them). The convolutions take
        any side divisible by 4, so `sample_size`, the side it is trained on, is recorded for the samplers (as
        diffusers' UNet2DModel records its own), not built in: it adds no weights and draws nothing from the RNG."""
        super().__init__()
        self.sample_size = sample_size
        self.down_layers = nn.ModuleList(
            [
                nn.Conv2d(in_channels, 32, kernel_size=5, padding=2),
                nn.Conv2d(32, 64, kernel_size=5, padding=2),
                nn.Conv2d(64, 64, kernel_size=5, padding=2),
            ]
        )
        self.up_layers = nn.ModuleList(
            [
                nn.Conv2d(64, 64, kernel_size=5, padding=2),
                nn.Conv2d(64, 32, kernel_size=5, padding=2),
                nn.Conv2d(32, out_channels, kernel_size=5, padding=2),
            ]
        )
        self.act = nn.SiLU()
        self.downscale = nn.MaxPool2d(2)
        self.upscale = nn.Upsample(scale_factor=2)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images it draws: what every denoiser here tells the samplers."""
        return (self.down_layers[0].in_channels, self.sample_size, self.sample_size)

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C, H, W) in [0, 1], H and W divisible by 4 (two poolings); `t` is accepted for the shared denoiser
        call and ignored."""
        skips = []
        for i, layer in enumerate(self.down_layers):
            x = self.act(layer(x))
            if i < 2:  # the bottom layer has no skip and no pooling
                skips.append(x)
                x = self.downscale(x)
        for i, layer in enumerate(self.up_layers):
            if i > 0:
                x = self.upscale(x) + skips.pop()
            x = self.act(layer(x))
        return x
