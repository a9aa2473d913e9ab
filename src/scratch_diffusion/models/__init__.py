"""Denoisers. Every network here is called the same way: `model(x_t, t) -> prediction`."""

from scratch_diffusion.models.basic_unet import BasicUNet

__all__ = ["BasicUNet"]
