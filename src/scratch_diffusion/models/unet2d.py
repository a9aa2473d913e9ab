"""diffusers' UNet2DModel behind the shared denoiser call `model(x_t, t) -> prediction`.

The adapter owns the timestep conditioning, so objectives and samplers pass the true t and never ask which
network or conditioning they hold:
- `timestep`: t (0..T-1) goes into the time embedding, as in DDPM;
- `none`: the embedding always sees 0 (the lesson's first UNet2DModel run: the net must infer the noise level);
- `amount`: toy corruption, t is the amount in [0, 1], embedded as amount * 1000 (the lesson's suggestion).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from scratch_diffusion.choices import CONDITIONINGS

# diffusers is imported where a UNet2DModel is built or wrapped: importing it takes seconds, and the stages that never
# touch a UNet2DModel (train-basic, the judge's) import this module through the library.
if TYPE_CHECKING:
    from diffusers import UNet2DModel


def build_unet(
    block_out_channels: Sequence[int] = (32, 64, 64),
    layers_per_block: int = 2,
    down_block_types: Sequence[str] = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    up_block_types: Sequence[str] = ("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    *,
    sample_size: int,
    channels: int,
    num_classes: int = 0,
) -> UNet2DModel:
    """The lesson's UNet2DModel architecture by default (1,707,009 parameters on 28 x 28 grey images), for images of
    the dataset's `sample_size` (side in pixels) and `channels`, which diffusers records in the model's config, so
    the model folder says what to draw.

    With `num_classes` > 0 it is class-conditional: diffusers adds an embedding of `num_classes + 1` labels to the
    time embedding; the last label means "no label" (classifier-free guidance's unconditional model).
    """
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        layers_per_block=layers_per_block,
        block_out_channels=tuple(block_out_channels),
        down_block_types=tuple(down_block_types),
        up_block_types=tuple(up_block_types),
        num_class_embeds=num_classes + 1 if num_classes else None,
    )


class CpuFp32Attention:
    """diffusers' attention, run in fp32 on the CPU even under bf16 autocast.

    The lesson's UNet2DModel has 8 heads of dimension 8: PyTorch's CPU flash attention is slower in bf16 than in fp32
    at that size, and attention takes a large share of a training step, so bf16 autocast of the whole network was
    slower than fp32 (docs/performance.md); with the attention kept in fp32 the convolutions' gain remains. On GPUs,
    bf16 attention is fast: there it is left to autocast. Wraps diffusers' public processor rather than subclassing
    it, so a change of its internals cannot break this one.
    """

    def __init__(self):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.processor = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        # The same parameters as diffusers' processor: Attention drops keyword arguments a processor does not name.
        inputs = (encoder_hidden_states, attention_mask, temb)
        if hidden_states.device.type != "cpu" or not torch.is_autocast_enabled("cpu"):
            return self.processor(attn, hidden_states, *inputs)
        with torch.autocast("cpu", enabled=False):
            return self.processor(attn, hidden_states.float(), *inputs)


class UNet2DDenoiser(nn.Module):
    def __init__(self, unet: UNet2DModel, conditioning: str = "timestep"):
        from diffusers.models.attention_processor import Attention

        super().__init__()
        if conditioning not in CONDITIONINGS:
            raise ValueError(f"unknown conditioning {conditioning!r}; allowed: {', '.join(CONDITIONINGS)}")
        self.unet = unet
        self.conditioning = conditioning
        for module in unet.modules():
            if isinstance(module, Attention):
                module.set_processor(CpuFp32Attention())

    @property
    def null_label(self) -> int | None:
        """The "no label" token of a class-conditional net (None for an unconditional one)."""
        n = self.unet.config.num_class_embeds
        return n - 1 if n else None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images it draws, from diffusers' config (sample_size is an int or (H, W))."""
        size = self.unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else size
        return (self.unet.config.in_channels, height, width)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """x_t: (B, C, H, W); t: (B,) timesteps (or toy amounts in [0, 1]) -> prediction (B, C, H, W).

        `y`: (B,) class labels (0..num_classes-1) for a class-conditional net; None (or the null label) asks for no
        label.
        """
        if self.conditioning == "none":
            t = torch.zeros_like(t)
        elif self.conditioning == "amount":
            t = t * 1000
        if self.null_label is None:
            if y is not None:
                raise ValueError("labels given to a UNet2DModel that was not trained class-conditional")
            return self.unet(x_t, t).sample
        if y is None:
            y = torch.full((x_t.shape[0],), self.null_label, device=x_t.device)
        return self.unet(x_t, t, class_labels=y).sample


class Guided(nn.Module):
    """Classifier-free guidance (Ho & Salimans 2022) behind the shared call `model(x_t, t)`, for every sampler.

    pred = uncond + scale * (cond - uncond): scale 0 is the unconditional model, 1 the plain conditional one (one
    forward pass each); otherwise both go through one forward call of twice the batch. Predictions of x0, eps and
    v are all affine in each other at fixed x_t, so the same combination serves every objective.
    """

    def __init__(self, model: UNet2DDenoiser, labels: torch.Tensor, scale: float):
        super().__init__()
        if model.null_label is None:
            raise ValueError("guidance needs a class-conditional model (unet2d.class_conditional: true)")
        self.model, self.labels, self.scale = model, labels, float(scale)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.model.image_shape

    @staticmethod
    def batch_multiple(scale: float) -> int:
        """Images the network evaluates per image asked for at `scale`: 1 at scale 0 or 1, else 2."""
        return 1 if scale in (0, 1) else 2

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        labels = self.labels.to(x_t.device)
        null = torch.full_like(labels, self.model.null_label)
        if self.batch_multiple(self.scale) == 1:
            return self.model(x_t, t, labels if self.scale == 1 else null)
        both = self.model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([labels, null]))
        cond, uncond = both.float().chunk(2)
        return uncond + self.scale * (cond - uncond)
