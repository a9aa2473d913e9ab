"""Training objectives: what the network predicts, the loss on it, and how x0 is recovered from it.

Notation (DDPM, Ho et al. 2020): x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps, data in [-1, 1].
- x0:  predict the clean image (the toy model's target);                       diffusers: prediction_type "sample"
- eps: predict the unit-variance noise (DDPM);                                 diffusers: "epsilon"
- v:   predict v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0
       (Salimans & Ho 2022, "Progressive Distillation for Fast Sampling");   diffusers: "v_prediction"

Flow matching (Lipman et al. 2023; rectified flow, Liu et al. 2023) replaces the noise schedule by the straight path
x_t = (1 - t) x0 + t eps, t in [0, 1], and predicts its velocity dx_t/dt = eps - x0 (`flow`). The UNet sees the time
as t * num_train_timesteps: diffusers' flow-matching schedulers call sigma = t and timestep = sigma * T.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from scratch_diffusion.choices import LOSS_WEIGHTINGS, PREDICTION_TYPES, TIME_SAMPLINGS
from scratch_diffusion.corruption import corrupt, to_model_range


def _check(objective: str) -> None:
    if objective not in PREDICTION_TYPES:
        raise ValueError(f"unknown objective {objective!r}; allowed: {', '.join(PREDICTION_TYPES)}")


def per_image(a: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, 1): one value per image, broadcast over pixels."""
    return a.view(-1, *([1] * (like.ndim - 1)))


def target(objective: str, x0: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """The regression target for `objective`; alpha_bar broadcasts against x0."""
    _check(objective)
    if objective == "x0":
        return x0
    if objective == "eps":
        return eps
    return alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * x0


def x0_from_prediction(objective: str, pred: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor):
    """The model's estimate of x0, whatever it predicts (exact when the prediction is)."""
    _check(objective)
    if objective == "x0":
        return pred
    if objective == "eps":
        return (x_t - (1 - alpha_bar).sqrt() * pred) / alpha_bar.sqrt()
    return alpha_bar.sqrt() * x_t - (1 - alpha_bar).sqrt() * pred


def snr(alpha_bar: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar)."""
    return alpha_bar / (1 - alpha_bar)


def min_snr_weight(objective: str, snr_t: torch.Tensor, gamma: float = 5.0) -> torch.Tensor:
    """Min-SNR-gamma loss weight (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting").

    The paper's weight on the x0-space error is min(SNR, gamma). An eps-space MSE equals the x0-space MSE divided
    by SNR, and a v-space MSE the x0-space MSE divided by (SNR + 1) (times constants), so the same weighting
    becomes min(SNR, gamma) / SNR for eps and min(SNR, gamma) / (SNR + 1) for v.
    """
    _check(objective)
    clipped = snr_t.clamp(max=gamma)
    if objective == "x0":
        return clipped
    if objective == "eps":
        return clipped / snr_t
    return clipped / (snr_t + 1)


def ddpm_loss(
    scheduler,
    objective: str,
    weighting: str = "none",
    gamma: float = 5.0,
    label_dropout: float = 0.0,
    null_label: int | None = None,
) -> Callable:
    """`loss_fn(model, x0_pixels[, labels])` for DDPM training: t ~ U{0..T-1}, Gaussian noise, MSE on the objective's
    target; labels as _predict says."""
    _check(objective)
    if weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"unknown loss weighting {weighting!r}; allowed: {', '.join(LOSS_WEIGHTINGS)}")
    num_t = scheduler.config.num_train_timesteps

    def loss_fn(model, x01: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        x0 = to_model_range(x01)  # (B, C, H, W) in [-1, 1]
        eps = torch.randn_like(x0)
        t = torch.randint(0, num_t, (x0.shape[0],), device=x0.device)
        alpha_bar = per_image(scheduler.alphas_cumprod.to(x0.device)[t].float(), x0)
        x_t = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * eps  # = scheduler.add_noise(x0, eps, t)
        pred = _predict(model, x_t, t, y, label_dropout, null_label)
        per_img = ((pred - target(objective, x0, eps, alpha_bar)) ** 2).mean(dim=(1, 2, 3))
        if weighting == "min_snr":
            per_img = per_img * min_snr_weight(objective, snr(alpha_bar.flatten()), gamma)
        return per_img.mean()

    return loss_fn


def _predict(model, x_t, t, y, label_dropout: float, null_label: int | None) -> torch.Tensor:
    """The model's prediction; with labels (class-conditional nets), each replaced by `null_label` with probability
    `label_dropout`, so the same net also learns the unconditional prediction that classifier-free guidance needs."""
    if y is None:
        return model(x_t, t).float()
    drop = torch.rand(y.shape[0], device=y.device) < label_dropout
    return model(x_t, t, torch.where(drop, null_label, y)).float()


def flow_path(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t eps, t (B,) in [0, 1]: the data at t = 0, pure noise at t = 1."""
    t = per_image(t, x0)
    return (1 - t) * x0 + t * eps


def flow_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The velocity of the straight path, d x_t / dt = eps - x0 (the same at every t)."""
    return eps - x0


def _check_time_sampling(time_sampling: str) -> None:
    if time_sampling not in TIME_SAMPLINGS:
        raise ValueError(f"unknown time sampling {time_sampling!r}; allowed: {', '.join(TIME_SAMPLINGS)}")


def flow_times(
    n: int, time_sampling: str, logit_mean: float = 0.0, logit_std: float = 1.0, device=None
) -> torch.Tensor:
    """n training times in (0, 1): uniform, or logit-normal (sigmoid of N(logit_mean, logit_std^2)), which spends
    the steps on the middle of the path, where the velocity is hardest to predict (Esser et al. 2024, SD3)."""
    _check_time_sampling(time_sampling)
    if time_sampling == "uniform":
        return torch.rand(n, device=device)
    return torch.sigmoid(logit_mean + logit_std * torch.randn(n, device=device))


def flow_loss(
    num_train_timesteps: int,
    time_sampling: str = "uniform",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    label_dropout: float = 0.0,
    null_label: int | None = None,
) -> Callable:
    """`loss_fn(model, x0_pixels[, labels])` for flow matching: t from `time_sampling`, Gaussian noise, MSE on the
    velocity. The model is called at timestep t * num_train_timesteps, the scale of diffusers' flow-matching
    schedulers, so a saved model and FlowMatchEulerDiscreteScheduler agree on what a timestep means."""
    _check_time_sampling(time_sampling)  # now, not at the first step

    def loss_fn(model, x01: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        x0 = to_model_range(x01)
        eps = torch.randn_like(x0)
        t = flow_times(x0.shape[0], time_sampling, logit_mean, logit_std, device=x0.device)
        pred = _predict(model, flow_path(x0, eps, t), t * num_train_timesteps, y, label_dropout, null_label)
        return ((pred - flow_target(x0, eps)) ** 2).mean()

    return loss_fn


def classifier_loss(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The judge's objective (models.classifier): cross-entropy of its logits against the images' classes."""
    return F.cross_entropy(model(x), y)


def toy_loss(model, x0: torch.Tensor) -> torch.Tensor:
    """The lesson's objective: corrupt x0 (in [0, 1]) by amount ~ U(0, 1) per image, predict x0, MSE.

    The amount is passed as t; BasicUNet ignores it, a UNet2DDenoiser uses it per its conditioning.
    """
    amount = torch.rand(x0.shape[0], device=x0.device)
    x_t = corrupt(x0, amount)
    return F.mse_loss(model(x_t, amount).float(), x0)
