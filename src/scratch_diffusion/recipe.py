"""From params to the parts of a train-unet2d run, in one place: the stage, the speed benchmark and the EMA-horizon
ablation build the same network, noise schedule, loss and EMA from the same keys."""

from __future__ import annotations

from collections.abc import Callable

from diffusers import DDPMScheduler

from scratch_diffusion.config import PREDICTION_TYPES, Params
from scratch_diffusion.corruption import ddpm_scheduler
from scratch_diffusion.data import NUM_CLASSES
from scratch_diffusion.models import UNet2DDenoiser, build_unet
from scratch_diffusion.objectives import ddpm_loss, toy_loss
from scratch_diffusion.training import EMA


def unet2d_parts(params: Params) -> tuple[UNet2DDenoiser, DDPMScheduler, Callable, EMA | None]:
    """(denoiser, DDPM scheduler, loss_fn, EMA or None) for `params.unet2d` and `params.objective`.

    The weights are drawn from torch's global generator: seed it first for the stage's initial weights.
    """
    p = params.unet2d
    num_classes = NUM_CLASSES if p.class_conditional else 0
    unet = build_unet(p.block_out_channels, p.layers_per_block, p.down_block_types, p.up_block_types,
                      num_classes=num_classes)  # fmt: skip
    model = UNet2DDenoiser(unet, p.conditioning)
    scheduler = ddpm_scheduler(p.num_train_timesteps, p.beta_schedule, p.beta_start, p.beta_end,
                               PREDICTION_TYPES[params.objective])  # fmt: skip
    if p.corruption == "toy":
        loss_fn = toy_loss
    else:
        loss_fn = ddpm_loss(scheduler, params.objective, p.loss_weighting, p.min_snr_gamma,
                            label_dropout=p.label_dropout, null_label=model.null_label)  # fmt: skip
    ema = EMA(model, p.ema_decay, p.ema_warmup) if p.ema_decay > 0 else None
    return model, scheduler, loss_fn, ema
