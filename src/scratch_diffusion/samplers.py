"""Samplers: from noise to images with a trained denoiser `model(x_t, t) -> prediction`.

Two families:
- `toy_sample`: the lesson's step sampler for x0-predicting toy models, in [0, 1];
- `diffusion_sample`: any diffusers scheduler (built `from_config` of the trained model's DDPM scheduler), in
  [-1, 1], with `scale_model_input` and `init_noise_sigma` applied, as Euler/Heun need and DDPMPipeline forgets.
  A flow model's sampler of the same name solves its own path: diffusers' flow-matching Euler and Heun, DPM-Solver++
  and UniPC on flow sigmas, and DDIM on the straight path (FlowDDIM); DDPM's ancestral chain has no flow counterpart.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable
from types import SimpleNamespace

import numpy as np
import torch

from scratch_diffusion import tuning
from scratch_diffusion.choices import DIFFUSERS_SAMPLERS, SAMPLE_PRECISIONS
from scratch_diffusion.corruption import is_flow, to_pixel_range
from scratch_diffusion.hardware import for_sampling
from scratch_diffusion.images import to_uint8
from scratch_diffusion.models.unet2d import Guided
from scratch_diffusion.tuning import Candidate

# The sampler -> its diffusers scheduler class, by name: diffusers is imported when a scheduler is made (importing it
# takes seconds, and the toy sampler needs none of it).
SCHEDULERS = {
    "ddpm": "DDPMScheduler",
    "ddim": "DDIMScheduler",
    "dpmsolver++": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "unipc": "UniPCMultistepScheduler",
}
# Overrides on top of the trained config. DDIM with "linspace" spacing reads wrong alphas in current diffusers
# releases; "trailing" ends exactly at t = T-1 (Lin et al. 2023, "Common Diffusion Noise Schedules ... are Flawed").
_OVERRIDES = {
    "ddim": {"timestep_spacing": "trailing"},
    "dpmsolver++": {"algorithm_type": "dpmsolver++"},
}


@torch.inference_mode()
def toy_sample(model, x: torch.Tensor, steps: int, record: bool = False):
    """The lesson's step sampler for x0-predicting toy models, in [0, 1].

    Start from uniform noise `x`; at step i move a fraction 1/(steps - i) of the way to the model's prediction:
    x <- x * (1 - 1/(steps - i)) + pred / (steps - i). The last step (i = steps-1) returns the prediction itself.
    With `record`, also returns each step's input and prediction (for the lesson's 5-step picture).
    """
    inputs, preds = [], []
    for i in range(steps):
        # The noise amount the sampler assumes, passed as t: BasicUNet ignores it, `amount`-conditioned nets use it.
        t = torch.full((x.shape[0],), 1 - i / steps, device=x.device)
        pred = model(x, t).float()
        if record:
            inputs.append(x.cpu())
            preds.append(pred.cpu())
        mix = 1 / (steps - i)
        x = x * (1 - mix) + pred * mix
    return (x, inputs, preds) if record else x


class FlowDDIM:
    """DDIM (Song et al. 2021) on flow matching's path x_s = (1 - s) x0 + s eps, s = timestep / T, called as diffusers'
    schedulers are (set_timesteps, timesteps, step(...).prev_sample). Each step recovers x0 = x - s v, clipped to the
    data range as the DDPM models' DDIM clips it, and eps = (x - (1 - s) x0) / s, and moves to the next s along the
    path: with eta 0 deterministically (without the clip, exactly an Euler step of the flow ODE), with eta 1 re-noised
    as the path's forward process's posterior q(x_s' | x_s, x0) is (the counterpart of DDPM's ancestral step)."""

    init_noise_sigma = 1.0

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0):
        self.num_train_timesteps, self.shift = num_train_timesteps, shift

    def set_timesteps(self, steps: int, device=None) -> None:
        s = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
        s = self.shift * s / (1 + (self.shift - 1) * s)  # diffusers' shift, as FlowMatchEulerDiscreteScheduler's
        self.sigmas = s.tolist()
        self.timesteps = (s[:-1] * self.num_train_timesteps).float().to(device)
        self._index = 0

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 0.0, generator=None):
        s, s_next = self.sigmas[self._index], self.sigmas[self._index + 1]
        self._index += 1
        x0 = (sample - s * model_output).clamp(-1, 1)
        if s_next == 0:
            return SimpleNamespace(prev_sample=x0)
        eps = (sample - (1 - s) * x0) / s
        # eta times the posterior's standard deviation: for x_s = a_s x0 + s eps (a = 1 - s) it is
        # s' sqrt(1 - (a_s s' / (a_s' s))^2); any value up to s' keeps every x_s' distributed as the path says.
        ratio = (1 - s) * s_next / ((1 - s_next) * s)
        c = eta * s_next * math.sqrt(max(0.0, 1 - ratio**2))
        prev = (1 - s_next) * x0 + math.sqrt(s_next**2 - c**2) * eps
        if c:
            prev = prev + c * torch.randn(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
        return SimpleNamespace(prev_sample=prev)


# A flow model's samplers: diffusers' flow-matching schedulers, its multistep solvers on flow sigmas, and FlowDDIM.
_FLOW_SCHEDULERS = {
    "ddim": None,
    "dpmsolver++": "DPMSolverMultistepScheduler",
    "euler": "FlowMatchEulerDiscreteScheduler",
    "heun": "FlowMatchHeunDiscreteScheduler",
    "unipc": "UniPCMultistepScheduler",
}


def samplers_for(corruption: str, trained_config) -> tuple[str, ...]:
    """The samplers a trained model takes: the lesson's for a toy-corruption model, a flow model's (all but ddpm), or
    every diffusers sampler for a DDPM one."""
    if corruption == "toy":
        return ("toy",)
    return tuple(_FLOW_SCHEDULERS) if is_flow(trained_config) else DIFFUSERS_SAMPLERS


def trained_with(corruption: str, trained_config) -> str:
    """What a model was trained on, for messages that say why a sampler is refused."""
    return "flow matching" if corruption != "toy" and is_flow(trained_config) else f"the {corruption} corruption"


def make_scheduler(name: str, trained_config, shift: float = 1.0, **options):
    """A fresh scheduler of kind `name` built from the trained model's scheduler config (betas, prediction_type), or
    for a flow model (a FlowMatchEulerDiscreteScheduler config) the flow sampler of that name, with diffusers'
    `shift` applied to its sigmas.

    Fresh each call: multistep schedulers (DPM-Solver++, UniPC) keep state between `step` calls.
    """
    if name not in SCHEDULERS:
        raise ValueError(f"unknown sampler {name!r}; allowed: {', '.join(SCHEDULERS)}, toy")
    import diffusers

    if not is_flow(trained_config):
        if shift != 1:
            raise ValueError(f"shift: got {shift!r} for a DDPM model; allowed: 1 (shift is for a flow model's steps)")
        scheduler = getattr(diffusers, SCHEDULERS[name])
        return scheduler.from_config(trained_config, **{**_OVERRIDES.get(name, {}), **options})
    if name not in _FLOW_SCHEDULERS:
        raise ValueError(
            f"sampler {name!r} is DDPM's ancestral chain, which a flow model does not have; allowed: "
            f"{', '.join(_FLOW_SCHEDULERS)} (ddim with eta 1 is its counterpart on the flow path)"
        )
    num_train_timesteps = trained_config["num_train_timesteps"]
    if name == "ddim":
        return FlowDDIM(num_train_timesteps, shift)
    scheduler = getattr(diffusers, _FLOW_SCHEDULERS[name])
    if name in ("euler", "heun"):
        return scheduler.from_config(trained_config, shift=shift, **options)
    flow = {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": shift}
    return scheduler(num_train_timesteps=num_train_timesteps, **flow, **_OVERRIDES.get(name, {}), **options)


@torch.inference_mode()
def diffusion_sample(model, scheduler, steps: int, noise: torch.Tensor, generator=None, eta: float = 0.0):
    """Run `scheduler` for `steps` from Gaussian `noise` (B, C, H, W); returns (x0 in [-1, 1], NFE).

    NFE (model evaluations) is counted, not assumed: Heun evaluates about twice per step.
    """
    scheduler.set_timesteps(steps, device=noise.device)
    step_params = inspect.signature(scheduler.step).parameters
    step_kwargs = {}
    if "generator" in step_params:
        step_kwargs["generator"] = generator
    if "eta" in step_params:
        step_kwargs["eta"] = eta
    if "use_clipped_model_output" in step_params:
        # DDIM clips its x0 estimate to the data range but, by default, keeps the noise estimate of the unclipped
        # one; the next x_t then mixes two images. Under classifier-free guidance the extrapolated prediction leaves
        # the range by far, and the noise term steers every step away from the digit asked for (the oracle test in
        # tests/test_samplers.py). Deriving eps from the clipped x0 keeps the step consistent (as GLIDE does).
        step_kwargs["use_clipped_model_output"] = True
    x = noise * getattr(scheduler, "init_noise_sigma", 1.0)  # flow-matching schedulers start at unit noise, unsaid
    scale = getattr(scheduler, "scale_model_input", None)
    nfe = 0
    for t in scheduler.timesteps:
        x_in = scale(x, t) if scale is not None else x
        pred = model(x_in, t.expand(x.shape[0]).to(noise.device)).float()
        nfe += 1
        x = scheduler.step(pred, t, x, **step_kwargs).prev_sample
    return x, nfe


def fixed_noise(n: int, corruption: str, seed: int, shape: tuple[int, int, int]) -> torch.Tensor:
    """The start noise for a sample set of `n` images of `shape` (C, H, W): uniform in [0, 1] for toy models,
    standard normal for DDPM ones."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, *shape, generator=g) if corruption == "toy" else torch.randn(n, *shape, generator=g)


def sample_images(
    model, sampler: str, steps: int, noise: torch.Tensor, trained_config=None, seed: int = 0, **options
) -> tuple[torch.Tensor, int]:
    """One entry point for every sampler: returns (images in [0, 1] (B, C, H, W), NFE).

    `toy` is the lesson's sampler (noise in [0, 1]); any other name is a diffusers scheduler built from
    `trained_config` (noise standard normal, model range [-1, 1], mapped back to pixels here).
    """
    if sampler == "toy":
        return toy_sample(model, noise, steps).clamp(0, 1), steps
    generator = torch.Generator(device=noise.device).manual_seed(seed)
    eta = options.pop("eta", 0.0)
    scheduler = make_scheduler(sampler, trained_config, **options)  # options: a flow model's shift
    x, nfe = diffusion_sample(model, scheduler, steps, noise, generator=generator, eta=eta)
    return to_pixel_range(x), nfe


PRECISIONS = tuple(p for p in SAMPLE_PRECISIONS if p != "auto")  # hardware.for_sampling resolved auto


def image_shape(model) -> tuple[int, int, int]:
    """(C, H, W) of the images `model` draws, as the model says (`model.image_shape`): a BasicUNet from the folder
    it was loaded from, a UNet2DDenoiser from diffusers' config, Guided from the model it guides."""
    shape = getattr(model, "image_shape", None)
    if shape is None:
        raise TypeError(
            f"{type(model).__name__} does not say the shape of its images (no `image_shape`); allowed: a BasicUNet, "
            "a UNet2DDenoiser, or Guided around one"
        )
    return tuple(shape)


def generate(
    model,
    sampler: str,
    steps: int,
    n: int,
    *,
    batch_size: int,
    seed: int,
    corruption: str,
    trained_config=None,
    device="cpu",
    eta: float = 0.0,
    shift: float = 1.0,
    precision: str = "fp32",
    channels_last: bool = False,
    labels: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    progress=None,
) -> tuple[np.ndarray, int]:
    """`n` images as uint8, (n, H, W) for a one-channel model and (n, H, W, 3) for an RGB one, from one sampler
    setting, in batches, and the NFE per image. The image shape is the model's (`image_shape`).

    The start noise of all n images comes from one generator seeded with `seed`, so a batch size change does
    not change the images of a deterministic sampler; stochastic ones (ddpm) get one generator per batch.
    `precision` bf16 evaluates the model under bf16 autocast; noise, scheduler steps and outputs stay fp32.
    `channels_last` evaluates in the NHWC memory layout (the model is converted in place).
    `labels` (n,) asks a class-conditional model for those classes, with classifier-free guidance at
    `guidance_scale`; NFE then counts forward calls (a guided call evaluates a double batch).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; allowed: {', '.join(PRECISIONS)}")
    device = torch.device(device)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=layout)
    noise = fixed_noise(n, corruption, seed, image_shape(model))
    options = {"eta": eta} if sampler == "ddim" else {}
    if shift != 1:  # a flow model's (make_scheduler refuses it for others)
        options["shift"] = shift
    out, nfe = [], 0
    for i, start in enumerate(range(0, n, batch_size)):
        net = model if labels is None else Guided(model, labels[start : start + batch_size], guidance_scale)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            x01, nfe = sample_images(
                net,
                sampler,
                steps,
                noise[start : start + batch_size].to(device).contiguous(memory_format=layout),
                trained_config,
                seed=seed + i,
                **options,
            )
        out.append(to_uint8(x01))
        if progress is not None:
            progress(x01.shape[0])
    return np.concatenate(out), nfe


def evaluation_step(model, batch: int, device) -> Callable[[Candidate], Callable[[], float]]:
    """For tuning.measure: one model evaluation of `batch` images of the model's shape, as the samplers call it, on
    a copy of `model` in a candidate's precision (autocast) and layout. The model given is not touched."""
    device = torch.device(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *image_shape(model), generator=g).to(device)
    t = torch.full((batch,), 500, device=device)  # a DDPM timestep (a toy model reads it as an amount, or not at all)

    def setup(candidate: Candidate) -> Callable[[], float]:
        layout = torch.channels_last if candidate.channels_last else torch.contiguous_format
        net = copy.deepcopy(model).to(device, memory_format=layout).eval()
        x_in = x.contiguous(memory_format=layout)

        @torch.inference_mode()
        def step() -> float:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=candidate.precision == "bf16"):
                return float(net(x_in, t).float().mean())

        return step

    return setup


def sampling_choice(
    model,
    precision: str,
    channels_last: str | bool,
    device,
    *,
    batch: int,
    evaluations: int,
):
    """The precision and layout that `model` is evaluated in while `evaluations` model calls of `batch` images are
    drawn: params' values, `auto` timed on this model (tuning.resolve, cached per
    machine), or the rule where that many calls are too few to pay for timing."""
    rule = for_sampling(precision, channels_last, device)
    key = {
        **tuning.machine_key(device),
        "network": type(model).__name__,
        "architecture": tuning.network_key(model),
        "image_shape": list(image_shape(model)),
    }
    return tuning.resolve(
        rule,
        precision,
        channels_last,
        training=False,
        steps=evaluations,
        batch=batch,
        key=key,
        run_step=evaluation_step(model, batch, device),
        device=device,
    )


def expected_evaluations(sampler: str, steps: int) -> int:
    """Model evaluations per image that a sampler setting makes, before running it (Heun: about two per step)."""
    return 2 * steps if sampler == "heun" else steps
