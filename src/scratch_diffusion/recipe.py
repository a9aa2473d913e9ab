"""From params to a training run, in one place: the training stages, the ablation scripts and the speed benchmark
build the same network (and, for the UNet2DModel, noise schedule, loss and EMA) from the same keys
(`basic_parts`, `unet2d_parts`) and train it with the same call (`fit_basic`, `fit_unet2d`), so a script that
retraces a stage cannot drift from it."""

from __future__ import annotations

from collections.abc import Callable

import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler

from scratch_diffusion.choices import PREDICTION_TYPES
from scratch_diffusion.config import Params
from scratch_diffusion.corruption import ddpm_scheduler
from scratch_diffusion.data import NUM_CLASSES
from scratch_diffusion.models import BasicUNet, UNet2DDenoiser, build_unet
from scratch_diffusion.objectives import ddpm_loss, toy_loss
from scratch_diffusion.training import EMA, TrainResult, fit

Parts = tuple[UNet2DDenoiser, DDPMScheduler, Callable, EMA | None]


def basic_parts(params: Params) -> BasicUNet:
    """The lesson's BasicUNet, its initial weights drawn from `params.seed` (its loss is the toy `toy_loss`)."""
    torch.manual_seed(params.seed)
    return BasicUNet()


def fit_basic(
    params: Params, model: BasicUNet, images: torch.Tensor, accelerator: Accelerator, channels_last: bool, **hooks
) -> TrainResult:
    """Train the BasicUNet as the train-basic stage does (the lesson's loop: toy corruption, x0 target, Adam)."""
    p = params.basic
    return fit(
        model,
        toy_loss,
        images,
        accelerator,
        batch_size=p.batch_size,
        lr=p.lr,
        epochs=p.epochs,
        seed=params.seed,
        max_steps=p.max_steps,
        log_every=p.log_every,
        channels_last=channels_last,
        **hooks,
    )


def unet2d_parts(params: Params) -> Parts:
    """(denoiser, DDPM scheduler, loss_fn, EMA or None) for `params.unet2d` and `params.objective`, the initial
    weights drawn from `params.seed`."""
    p = params.unet2d
    torch.manual_seed(params.seed)
    num_classes = NUM_CLASSES if p.class_conditional else 0
    unet = build_unet(
        p.block_out_channels, p.layers_per_block, p.down_block_types, p.up_block_types, num_classes=num_classes
    )
    model = UNet2DDenoiser(unet, p.conditioning)
    scheduler = ddpm_scheduler(
        p.num_train_timesteps, p.beta_schedule, p.beta_start, p.beta_end, PREDICTION_TYPES[params.objective]
    )
    if p.corruption == "toy":
        loss_fn = toy_loss
    else:
        loss_fn = ddpm_loss(
            scheduler,
            params.objective,
            p.loss_weighting,
            p.min_snr_gamma,
            label_dropout=p.label_dropout,
            null_label=model.null_label,
        )
    ema = EMA(model, p.ema_decay, p.ema_warmup) if p.ema_decay > 0 else None
    return model, scheduler, loss_fn, ema


def fit_unet2d(
    params: Params,
    parts: Parts,
    images: torch.Tensor,
    labels: torch.Tensor | None,
    accelerator: Accelerator,
    channels_last: bool,
    ema=None,
    **hooks,
) -> TrainResult:
    """Train `parts` (from `unet2d_parts(params)`) as the train-unet2d stage does. `ema` replaces the parts' own EMA
    (the EMA-horizon ablation's several averages); `hooks` are fit's callbacks, checkpointing and progress label."""
    p = params.unet2d
    model, _, loss_fn, own_ema = parts
    return fit(
        model,
        loss_fn,
        images,
        accelerator,
        batch_size=p.batch_size,
        lr=p.lr,
        epochs=p.epochs,
        seed=params.seed,
        max_steps=p.max_steps,
        grad_clip=p.grad_clip,
        lr_schedule=p.lr_schedule,
        warmup_steps=p.lr_warmup_steps,
        ema=own_ema if ema is None else ema,
        log_every=p.log_every,
        channels_last=channels_last,
        labels=labels if p.class_conditional else None,
        **hooks,
    )
