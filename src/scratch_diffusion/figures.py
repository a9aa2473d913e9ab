"""The figures that explain the forward process and the toy sampler, drawn from the code that trains and samples."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from scratch_diffusion.choices import BETA_SCHEDULES  # noqa: E402
from scratch_diffusion.corruption import corrupt, ddpm_scheduler, to_model_range  # noqa: E402
from scratch_diffusion.files import atomic_path  # noqa: E402
from scratch_diffusion.objectives import snr  # noqa: E402


def schedule_curves(num_train_timesteps: int, beta_schedule: str, beta_start: float, beta_end: float) -> dict:
    """{label: (sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t), log SNR_t)} for the configured schedule and the others."""
    curves = {}
    configured = f"{beta_schedule} (configured)"
    for name in (beta_schedule, *[b for b in BETA_SCHEDULES if b != beta_schedule]):
        ab = ddpm_scheduler(num_train_timesteps, name, beta_start, beta_end).alphas_cumprod.double()
        label = configured if name == beta_schedule else name
        curves[label] = (ab.sqrt().numpy(), (1 - ab).sqrt().numpy(), snr(ab).log().numpy())
    return curves


def _save(fig, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_schedules(curves: dict, path: str | Path) -> None:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (label, (sqrt_ab, sqrt_1mab, log_snr)) in enumerate(curves.items()):
        color = f"C{i}"
        ax1.plot(sqrt_ab, color=color, label=f"sqrt(alpha_bar)  {label}")
        ax1.plot(sqrt_1mab, color=color, linestyle="--", label=f"sqrt(1 - alpha_bar)  {label}")
        ax2.plot(log_snr, color=color, label=label)
    ax1.set(xlabel="t", title="signal and noise scale of x_t", ylim=(0, 1.02))
    ax1.legend(fontsize=7)
    ax2.set(xlabel="t", ylabel="log SNR = log(alpha_bar / (1 - alpha_bar))", title="log signal-to-noise ratio")
    ax2.legend(fontsize=8)
    _save(fig, path)


def _row(ax, images: torch.Tensor, title: str, vmin: float, vmax: float) -> None:
    """One row of (B, C, H, W) images side by side, values vmin..vmax: grey (C = 1, the lesson's dark-on-light
    colour map) or RGB (C = 3, in colour)."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"figure row: got images of shape {tuple(images.shape)}; allowed: (B, 1, H, W) or (B, 3, H, W)"
        )
    strip = torch.cat(list(images), dim=2)  # (C, H, B*W)
    if strip.shape[0] == 1:
        ax.imshow(strip[0].numpy(), cmap="Greys", vmin=vmin, vmax=vmax)
    else:  # imshow ignores vmin/vmax for RGB and wants [0, 1]: map the range by hand
        ax.imshow(((strip - vmin) / (vmax - vmin)).clamp(0, 1).permute(1, 2, 0).numpy())
    ax.set_title(title, fontsize=9, loc="left")
    ax.axis("off")


def plot_corruption(x01: torch.Tensor, scheduler, path: str | Path, seed: int = 0) -> None:
    """Toy corruption with amount 0..1 next to DDPM noising at t = linspace(0, T-1, B), clipped and unclipped, of the
    images `x01` (B, C, H, W) in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    b = x01.shape[0]
    amount = torch.linspace(0, 1, b)
    toy = corrupt(x01, amount, torch.rand(x01.shape, generator=g))
    t = torch.linspace(0, scheduler.config.num_train_timesteps - 1, b).long()
    noisy = scheduler.add_noise(to_model_range(x01), torch.randn(x01.shape, generator=g), t)
    fig, axes = plt.subplots(4, 1, figsize=(1.3 * b, 6))
    _row(axes[0], x01, "input images", 0, 1)
    _row(axes[1], toy, "toy corruption, amount = " + ", ".join(f"{a:.2f}" for a in amount), 0, 1)
    _row(axes[2], noisy.clamp(-1, 1), "DDPM x_t clipped to [-1, 1], t = " + ", ".join(map(str, t.tolist())), -1, 1)
    lim = float(noisy.abs().max())
    _row(axes[3], noisy, f"DDPM x_t unclipped (shown on [-{lim:.1f}, {lim:.1f}])", -lim, lim)
    _save(fig, path)


def plot_sampling_steps(inputs: list[torch.Tensor], preds: list[torch.Tensor], path: str | Path) -> None:
    """The lesson's picture: for each step of the toy sampler, the input x and the model's prediction."""
    n = len(inputs)
    fig, axes = plt.subplots(n, 2, figsize=(12, 1.3 * n))
    axes = np.atleast_2d(axes)
    for i, (x, pred) in enumerate(zip(inputs, preds, strict=True)):
        _row(axes[i, 0], x.clamp(0, 1), f"step {i}: input x", 0, 1)
        _row(axes[i, 1], pred.clamp(0, 1), f"step {i}: model prediction", 0, 1)
    _save(fig, path)
