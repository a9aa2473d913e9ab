"""Denoisers. Every network here is called the same way: `model(x_t, t) -> prediction`."""

from scratch_diffusion.models.basic_unet import BasicUNet
from scratch_diffusion.models.unet2d import Guided, UNet2DDenoiser, build_unet

__all__ = ["BasicUNet", "Guided", "UNet2DDenoiser", "build_network", "build_unet"]


def build_network(network: str, unet2d, channels: int, resolution: int, num_classes: int = 0):
    """The network a training stage trains: the lesson's BasicUNet (`basic`), or the UNet2DModel that params'
    unet2d section (config.Unet2dParams) describes (`unet2d`), shaped for images of `channels` x `resolution` x
    `resolution` and, class-conditional, `num_classes` classes. recipe trains what this builds, and preflight builds
    the same to check params before any stage runs."""
    if network == "basic":
        return BasicUNet(channels, channels, sample_size=resolution)
    unet = build_unet(
        unet2d.block_out_channels,
        unet2d.layers_per_block,
        unet2d.down_block_types,
        unet2d.up_block_types,
        sample_size=resolution,
        channels=channels,
        num_classes=num_classes if unet2d.class_conditional else 0,
    )
    return UNet2DDenoiser(unet, unet2d.conditioning)
