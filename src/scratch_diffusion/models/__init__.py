"""Denoisers. Every network here is called the same way: `model(x_t, t) -> prediction`."""

from scratch_diffusion.models.basic_unet import BasicUNet
from scratch_diffusion.models.unet2d import Guided, UNet2DDenoiser, build_unet

__all__ = ["BasicUNet", "Guided", "UNet2DDenoiser", "build_unet"]
