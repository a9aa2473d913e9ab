"""The Accelerate training loop shared by every model: device, mixed precision, several processes.

The whole training split arrives as one uint8 tensor (N, 1, 28, 28); batches are converted to float on the device,
so there is no per-item PIL decode in the hot loop. `loss_fn(model, x0)` holds everything model-specific
(corruption, objective, weighting), so this loop never asks which network it trains.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm


def make_accelerator(mixed_precision: str = "fp32") -> Accelerator:
    """Accelerator for `mixed_precision` in fp32 | bf16 | fp16 (params say fp32 where Accelerate says "no":
    YAML 1.1 reads an unquoted `no` as false, and `dvc exp run -S` writes values unquoted)."""
    allowed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
    if mixed_precision not in allowed:
        raise ValueError(f"unknown mixed precision {mixed_precision!r}; allowed: {', '.join(allowed)}")
    return Accelerator(mixed_precision=allowed[mixed_precision])


class EMA:
    """Exponential moving average of a model's weights, the copy that samples and gets saved.

    decay_k = min(decay, (1 + k) / (10 + k)) after k updates: early on the average follows the weights closely,
    so a run of ~1.4k steps ends averaged over its last few hundred steps, not stuck near the initialisation
    (diffusers' EMAModel with power 3/4 warm-up reaches 0.999 only after ~10k steps).
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        ema_params = list(self.model.parameters())
        params = [p.detach().to(e.dtype) for p, e in zip(model.parameters(), ema_params, strict=True)]
        torch._foreach_lerp_(ema_params, params, 1 - decay)  # e <- e + (1 - decay) * (p - e)
        for e, b in zip(self.model.buffers(), model.buffers(), strict=True):
            e.copy_(b)


@dataclass
class TrainResult:
    steps: int = 0
    epoch_losses: list[float] = field(default_factory=list)
    # (step, mean loss over the steps since the previous point): the loss curve that is plotted and logged.
    loss_curve: list[tuple[int, float]] = field(default_factory=list)
    images_per_s: float = 0.0
    wall_s: float = 0.0

    @property
    def final_loss(self) -> float:
        return self.loss_curve[-1][1] if self.loss_curve else math.nan


def fit(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    accelerator: Accelerator,
    *,
    batch_size: int,
    lr: float,
    epochs: int,
    seed: int,
    max_steps: int = 0,
    grad_clip: float = 0.0,
    lr_schedule: str = "constant",
    warmup_steps: int = 0,
    ema: EMA | None = None,
    log_every: int = 10,
    on_log: Callable[[int, float], None] | None = None,
    sample_every: int = 0,
    on_sample: Callable[[int, torch.nn.Module], None] | None = None,
    desc: str = "train",
    labels: torch.Tensor | None = None,
) -> TrainResult:
    """Train `model` on `images` (uint8, (N, 1, H, W)) with Adam; returns losses and throughput.

    With `labels` (N,), the loss is called as `loss_fn(model, x0, y)` (classifiers, class-conditional models).
    `on_log(step, loss)` and `on_sample(step, model)` run on the main process only; `on_sample` gets the EMA
    weights when `ema` is given. `batch_size` is per process: with N processes the global batch is
    N * batch_size, and `lr` applies to that global batch (no automatic scaling).
    """
    if lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"unknown lr schedule {lr_schedule!r}; allowed: constant, cosine")
    set_seed(seed)
    loader = DataLoader(
        TensorDataset(images) if labels is None else TensorDataset(images, labels),
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    if ema is not None:
        ema.model.to(accelerator.device)

    total = epochs * len(loader)
    if max_steps:
        total = min(total, max_steps)
    # Warm-up then constant or cosine decay to 0, stepped once per optimizer step (not prepared: with several
    # processes Accelerate would step it once per process).
    scheduler = get_scheduler(
        "cosine" if lr_schedule == "cosine" else "constant_with_warmup",
        optimizer,
        num_warmup_steps=warmup_steps,
        num_training_steps=total,
    )
    main = accelerator.is_main_process
    bar = tqdm(total=total, desc=desc, disable=not (main and sys.stderr.isatty()), dynamic_ncols=True)
    plain_every = max(1, total // 20)  # off a terminal: about 20 plain progress lines

    result = TrainResult()
    step, seen = 0, 0
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        # Losses are summed on the device and read back every `log_every` steps: each `.item()` is a sync point.
        window_sum, window_n = torch.zeros((), device=accelerator.device), 0
        epoch_sum, epoch_n = torch.zeros((), device=accelerator.device), 0
        for batch, *y in loader:
            x0 = batch.float() / 255  # uint8 -> [0, 1]; models map to their own range in loss_fn
            loss = loss_fn(model, x0, *y)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            if grad_clip and accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            scheduler.step()
            if ema is not None:
                ema.update(model)

            step += 1
            seen += x0.shape[0] * accelerator.num_processes
            window_sum += loss.detach().float()
            epoch_sum += loss.detach().float()
            window_n += 1
            epoch_n += 1
            last = step == total
            if step % log_every == 0 or last:
                mean = accelerator.reduce(window_sum, "mean").item() / window_n
                window_sum.zero_()
                window_n = 0
                result.loss_curve.append((step, mean))
                if main and on_log:
                    on_log(step, mean)
                bar.set_postfix(loss=f"{mean:.4f}", epoch=epoch + 1)
            bar.update(1)
            if main and bar.disable and (step % plain_every == 0 or last):
                rate = seen / (time.perf_counter() - start)
                shown = f"loss {result.loss_curve[-1][1]:.4f} " if result.loss_curve else ""
                print(f"{desc}: step {step}/{total} epoch {epoch + 1} {shown}({rate:.0f} img/s)", flush=True)
            if on_sample and sample_every and step % sample_every == 0 and not last:
                accelerator.wait_for_everyone()
                if main:
                    on_sample(step, ema.model if ema is not None else accelerator.unwrap_model(model))
                model.train()
            if last:
                break
        result.epoch_losses.append(accelerator.reduce(epoch_sum, "mean").item() / max(epoch_n, 1))
        if step == total:
            break
    bar.close()
    result.wall_s = time.perf_counter() - start
    result.steps = step
    result.images_per_s = seen / result.wall_s
    accelerator.wait_for_everyone()
    return result
