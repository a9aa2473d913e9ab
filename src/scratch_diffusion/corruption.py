"""Forward (corruption) processes. Data ranges differ: the toy process lives in [0, 1], DDPM and flow matching in
[-1, 1]."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler


def corrupt(x: torch.Tensor, amount: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
    """The lesson's toy corruption: mix x (B, C, H, W) in [0, 1] with uniform noise by `amount` (B,) in [0, 1].

    x_t = x * (1 - amount) + U(0, 1) * amount. amount=0 keeps x, amount=1 is pure
    noise; the result stays in [0, 1].
    """
    if noise is None:
        noise = torch.rand_like(x)
    amount = amount.view(-1, *([1] * (x.ndim - 1)))  # (B,) -> (B, 1, 1, 1) to broadcast per image
    return x * (1 - amount) + noise * amount


def ddpm_scheduler(
    num_train_timesteps: int = 1000,
    beta_schedule: str = "linear",
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    prediction_type: str = "epsilon",
) -> DDPMScheduler:
    """The DDPM forward process (Ho et al. 2020): x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps.

    Saved with the model so that samplers are built `from_config` of exactly what training used.
    """
    from diffusers import DDPMScheduler  # here: importing diffusers takes seconds, the toy corruption needs none of it

    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule=beta_schedule,
        beta_start=beta_start,
        beta_end=beta_end,
        prediction_type=prediction_type,
    )


def flow_scheduler(num_train_timesteps: int = 1000) -> FlowMatchEulerDiscreteScheduler:
    """Flow matching's path (objectives.flow_path) as diffusers describes it: FlowMatchEulerDiscreteScheduler with
    timestep = sigma * num_train_timesteps, sigma = t. Saved with a flow model, so that its folder says how to sample
    it (DDPMPipeline runs it with Euler steps), as DDPMScheduler's config does for a DDPM model."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps)


def is_flow(scheduler_config) -> bool:
    """Whether a trained model's scheduler config is a flow-matching one (a `shift`, no betas), else DDPM's. By its
    keys: a config read from disk names its class, one built in memory does not."""
    return "shift" in scheduler_config and "beta_schedule" not in scheduler_config


def to_model_range(x01: torch.Tensor) -> torch.Tensor:
    """Pixels in [0, 1] -> DDPM's data range [-1, 1]."""
    return x01 * 2 - 1


def to_pixel_range(x: torch.Tensor) -> torch.Tensor:
    """DDPM's [-1, 1] -> pixels in [0, 1] (clipped)."""
    return ((x + 1) / 2).clamp(0, 1)
