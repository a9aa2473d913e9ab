"""Proof that validated params can run, before DVC removes any stage's outputs (stages/check_params.py calls it).

config.py checks each value's type and range and the rules between values; some faults show only when the real
objects are built: a block list diffusers refuses, a noise schedule whose alpha_bar reaches 0 (every sample black),
a sampler that draws NaN. `check_runnable` builds what the stages will build, with the functions they call:
- the networks: the BasicUNet and the UNet2DModel (models.build_network, which recipe trains them from)
  and the classifier, on the meta device (shapes without memory), each called once;
- the noise schedule (corruption.ddpm_scheduler), whose betas must lie in (0, 1) and whose alpha_bar must fall
  strictly within (0, 1) (Ho et al. 2020: x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps);
- every diffusers sampler of sample.settings, and the training grids' DDIM, through samplers.sample_images from that
  schedule's config as the sample stage reads it back from disk, run for its steps on a stand-in model that
  predicts zeros: whatever diffusers raises, or a non-finite image, is reported;
- for unlabelled data whose params name classifier.inception_weights: torchmetrics' Inception-v3 built from that file
  (compare's FID yardstick without a classifier).
Each fault is one ParamsError naming the key, the value and what is allowed. About a second on a CPU, beside the
imports.
"""

from __future__ import annotations

import importlib.util
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from scratch_diffusion.choices import DIFFUSERS_SAMPLERS, PREDICTION_TYPES
from scratch_diffusion.config import DEFAULT_SAMPLE_N, NAMED_DATASETS, Params, ParamsError, SampleSetting
from scratch_diffusion.corruption import ddpm_scheduler, flow_scheduler, is_flow
from scratch_diffusion.metrics import InceptionFeatures
from scratch_diffusion.models import build_network
from scratch_diffusion.models.classifier import Classifier
from scratch_diffusion.samplers import fixed_noise, sample_images


def check_runnable(params: Params, data: DataFacts | None = None) -> list[str]:
    """Raise ParamsError for the first thing the stages could not build or run with `params` on `data` (default: as
    the named dataset is known to be). Returns what the user should know before any training (one line each)."""
    data = data or DataFacts.named(params)
    notes = check_data(params, data)
    s = params.sample
    if s.n == "auto" and s.size(data.n_test) < DEFAULT_SAMPLE_N:  # first: it sizes every FID of this run
        n = s.size(data.n_test)
        notes.insert(
            0,
            f"sample.n auto: {n} images per setting, half the {data.n_test} test images (compare draws two real "
            f"sets of n; {DEFAULT_SAMPLE_N} where the test split holds {2 * DEFAULT_SAMPLE_N} or more)",
        )
    check_networks(params, data)
    trained = check_noise_schedule(params)
    check_samplers(params, trained)
    return notes


@dataclass(frozen=True)
class DataFacts:
    """What the checks need to know of the data: its shape, classes and split sizes."""

    channels: int
    resolution: int
    classes: tuple[str, ...]  # empty: unlabelled
    n_train: int
    n_test: int

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @classmethod
    def named(cls, params: Params) -> DataFacts:
        channels, resolution, n_train, n_test, num_classes = NAMED_DATASETS[params.data.dataset]
        # Their classes are named by their labels' values, as data.describe names them once downloaded.
        return cls(channels, resolution, tuple(map(str, range(num_classes))), n_train, n_test)

    @classmethod
    def listed(cls, params: Params, listing: dict) -> DataFacts:
        """From a folder's listing (data.source_listing) and the conversion params."""
        d = params.data
        return cls(d.channels, d.resolution, tuple(listing["classes"]), listing["n_train"], listing["n_test"])


def check_data(params: Params, data: DataFacts) -> list[str]:
    """The params that depend on the data's size and classes; for unlabelled data, what compare cannot measure."""
    d, s = params.data, params.sample
    if d.n_train > data.n_train:
        raise ParamsError(f"data.n_train: got {d.n_train}; the training split holds {data.n_train} images")
    if 2 * s.size(data.n_test) > data.n_test:
        raise ParamsError(
            f"sample.n: got {s.n}; compare needs 2 * n real test images and the test split holds {data.n_test} "
            f"(allowed: auto or 2..{data.n_test // 2}{'; or a larger data.held_out' if d.dataset == 'folder' else ''})"
        )

    if not data.num_classes:
        if params.unet2d.class_conditional:
            raise ParamsError(
                f"unet2d.class_conditional: got true, but {d.source} is unlabelled (no class folders); allowed: false,"
                " or one subfolder per class"
            )
        if params.classifier.inception_weights:
            check_inception_weights(params.classifier.inception_weights)
            return [
                f"{d.source} is unlabelled: compare will measure FID and KID on Inception-v3 features "
                f"(classifier.inception_weights), memorisation, cost and the pictures, but no recognised share or "
                "class coverage (they need classes: put the images in one subfolder per class)"
            ]
        return [
            f"{d.source} is unlabelled: compare will report memorisation, cost and the pictures, but no FID, KID, "
            "recognised share or class coverage (they need a classifier trained on labelled images: put them in "
            "one subfolder per class); for an Inception FID and KID, set classifier.inception_weights to the FID "
            "Inception-v3 weights file (torch-fidelity's weights-inception-2015-12-05-6726825d.pth)"
        ]
    s.class_indices(data.classes)  # ParamsError names a class the data lacks
    if params.classifier.inception_weights:
        return [
            f"classifier.inception_weights is set but unused: {d.source if d.dataset == 'folder' else d.dataset} is "
            "labelled, so compare measures FID on the classifier trained on its classes"
        ]
    return []


def check_inception_weights(weights: str) -> None:
    """The FID Inception-v3 weights file exists, torch-fidelity (torchmetrics' Inception network) is installed, and
    the file loads into that network (a second or two on a CPU): a wrong file stops check-params, not compare."""
    allowed = "allowed: the FID Inception-v3 weights (torch-fidelity's weights-inception-2015-12-05-6726825d.pth)"
    if not Path(weights).expanduser().is_file():
        raise ParamsError(f"classifier.inception_weights: got {weights!r}, which is no file; {allowed}, or '' for none")
    if importlib.util.find_spec("torch_fidelity") is None:
        raise ParamsError(
            f"classifier.inception_weights: got {weights!r}, but torch-fidelity (the Inception-v3 network of "
            "torchmetrics' FID) is not installed: `pip install torch-fidelity`, or set '' for no FID"
        )
    try:
        InceptionFeatures(weights, device="cpu")
    except Exception as e:  # torch.load's unpickling errors, load_state_dict's missing and unexpected keys, ...
        why = " ".join(str(e).split())[:200]
        raise ParamsError(
            f"classifier.inception_weights: got {weights!r}, which torchmetrics' Inception-v3 cannot load "
            f"({type(e).__name__}: {why}); {allowed}, or '' for none"
        ) from None


def check_networks(params: Params, data: DataFacts) -> None:
    """Build and call each network the training stages build (models.build_network, and the judge); a diffusers
    refusal becomes one ParamsError."""
    u = params.unet2d
    shape = (u, data.channels, data.resolution, data.num_classes)
    with torch.device("meta"):  # parameters and activations without storage: the lesson's UNet in milliseconds
        x, t = torch.zeros(2, data.channels, data.resolution, data.resolution), torch.zeros(2)  # (B, C, H, W), (B,)
        build_network("basic", *shape)(x, t)
        if data.num_classes:  # an unlabelled dataset has no classifier; shapes only: mean 0, std 1 stand in
            c = data.channels
            Classifier(c, data.resolution, data.num_classes, [0.0] * c, [1.0] * c)(x)
        try:
            y = torch.zeros(2, dtype=torch.long) if u.class_conditional else None
            out = build_network("unet2d", *shape)(x, t, y)
            if out.shape != x.shape:
                raise ValueError(f"it maps {tuple(x.shape)} to {tuple(out.shape)}")
        except Exception as e:  # diffusers' own errors: ValueError, RuntimeError (shapes), ...
            raise ParamsError(
                f"unet2d: diffusers' UNet2DModel cannot be built and called with block_out_channels="
                f"{list(u.block_out_channels)}, layers_per_block={u.layers_per_block}, down_block_types="
                f"{list(u.down_block_types)}, up_block_types={list(u.up_block_types)} ({type(e).__name__}: {e}); "
                "allowed: one down and one up block per channel count, e.g. params.yaml's defaults"
            ) from None


def schedule_fault(
    num_train_timesteps: int, beta_schedule: str, beta_start: float, beta_end: float
) -> tuple[str, int] | None:
    """What is wrong with the betas and alpha_bar (float32, as training uses them) that ddpm_scheduler builds, as
    (what, t), or None: betas must lie in (0, 1), alpha_bar fall strictly and stay within (0, 1)."""
    s = ddpm_scheduler(num_train_timesteps, beta_schedule, beta_start, beta_end)
    betas, alpha_bar = s.betas, s.alphas_cumprod
    if alpha_bar[0] >= 1:  # 1 - beta_0 rounds to 1: no noise at t = 0, an infinite signal-to-noise ratio
        return "alpha_bar is 1 at t = 0 (1 - beta_start rounds to 1 in float32)", 0
    bad = ((betas <= 0) | (betas >= 1)).nonzero()
    if len(bad):
        t = int(bad[0])
        return f"beta reaches {betas[t].item():.4g} at t = {t}", t
    flat = (alpha_bar[1:] >= alpha_bar[:-1]).nonzero()
    zero = (alpha_bar <= 0).nonzero()
    if len(zero) or len(flat):
        # alpha_bar underflows (to 0, or to a float32 value the next step cannot lower): x_t holds no image.
        t = int(zero[0]) if len(zero) else int(flat[0]) + 1
        if alpha_bar[t] <= 0:
            return f"alpha_bar reaches 0 at t = {t} (x_t holds no image from there on)", t
        return f"alpha_bar stops falling at t = {t}, at {alpha_bar[t].item():.3g} (float32 underflow)", t
    return None


def _edge(passes, good: float, bad: float, steps: int = 40) -> float:
    """The value nearest `bad` on the passing side of the boundary between `good` (passes) and `bad` (fails)."""
    for _ in range(steps):
        mid = (good + bad) / 2
        good, bad = (mid, bad) if passes(mid) else (good, mid)
    return good


def check_noise_schedule(params: Params) -> DDPMScheduler | FlowMatchEulerDiscreteScheduler:
    """The UNet2DModel's training schedule (as recipe.noise_schedule builds it), refused where it degenerates. The
    message blames beta_start for a fault at t = 0, else beta_end (or, for the cosine schedule, which has neither,
    num_train_timesteps), and says how far that key may go with the others as they are."""
    u = params.unet2d
    if params.objective == "flow":  # the straight path has no betas to degenerate
        return flow_scheduler(u.num_train_timesteps)
    fault = schedule_fault(u.num_train_timesteps, u.beta_schedule, u.beta_start, u.beta_end)
    if fault is not None and u.corruption == "ddpm":  # a toy-corruption model never uses its schedule
        what, t = fault
        given = f"beta_schedule={u.beta_schedule}, num_train_timesteps={u.num_train_timesteps}"
        allowed = "fewer num_train_timesteps"
        if u.beta_schedule == "squaredcos_cap_v2":
            key, value = "num_train_timesteps", u.num_train_timesteps
        else:
            given += f", beta_start={u.beta_start!r}, beta_end={u.beta_end!r}"
            key = "beta_start" if t == 0 else "beta_end"
            value = getattr(u, key)

            def passes(b: float) -> bool:
                ends = (b, u.beta_end) if key == "beta_start" else (u.beta_start, b)
                return schedule_fault(u.num_train_timesteps, u.beta_schedule, *ends) is None

            # The passing side: beta_start up to beta_end, beta_end down to (just above) beta_start.
            near = u.beta_end if key == "beta_start" else u.beta_start * (1 + 1e-6)
            if passes(near):
                edge = _edge(passes, near, 0.0 if key == "beta_start" else 1.0)
                allowed = f"{key} {'of at least' if key == 'beta_start' else 'up to'} {edge:.3g} with the others as set"
        raise ParamsError(
            f"unet2d.{key}: got {value!r} ({given}): {what}; allowed: {allowed}, so that every beta lies in (0, 1) and "
            "alpha_bar falls strictly within (0, 1)"
        )
    return ddpm_scheduler(
        u.num_train_timesteps, u.beta_schedule, u.beta_start, u.beta_end, PREDICTION_TYPES[params.objective]
    )


def _zero(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A stand-in denoiser: predicts zeros (a valid x0, eps or v alike)."""
    return torch.zeros_like(x_t)


def check_samplers(params: Params, trained: DDPMScheduler | FlowMatchEulerDiscreteScheduler) -> None:
    """Every unet2d setting of sample.settings fits the corruption, and each diffusers sampler, and the training
    grids' DDIM, runs for its steps on the `trained` schedule and draws finite images."""
    u = params.unet2d
    for i, s in enumerate(params.sample.settings):
        # The sample stage checks this against the trained model, after DVC has removed its outputs. Here rather
        # than in config.py: train-unet2d alone may train a toy-corruption model under ddpm sample settings.
        if s.model == "unet2d" and (s.sampler == "toy") != (u.corruption == "toy"):
            allowed = "'toy'" if u.corruption == "toy" else ", ".join(repr(n) for n in DIFFUSERS_SAMPLERS)
            raise ParamsError(
                f"sample.settings[{i}].sampler: got {s.sampler!r} for model 'unet2d' with unet2d.corruption="
                f"{u.corruption}; allowed: {allowed}"
            )
    if u.corruption != "ddpm":
        return  # toy-corruption models draw with the lesson's sampler only
    with tempfile.TemporaryDirectory() as tmp:  # the config as sample and generate read it (model_files.load_unet2d)
        trained.save_config(tmp)
        config = type(trained).from_pretrained(tmp).config
    runs = [(f"sample.settings[{i}]", s) for i, s in enumerate(params.sample.settings) if s.model == "unet2d"]
    runs.append(("unet2d.sample_steps", SampleSetting("unet2d", "ddim", u.sample_steps)))  # the training grids
    noise = fixed_noise(1, "ddpm", params.sample.seed, (1, 4, 4))  # the schedule's arithmetic is per pixel
    for key, s in runs:
        options = {"eta": s.eta} if s.sampler == "ddim" else {}  # as samplers.generate passes them
        if s.shift != 1:
            options["shift"] = s.shift
        try:
            x01, _ = sample_images(_zero, s.sampler, s.steps, noise, config, **options)
        except Exception as e:
            raise ParamsError(
                f"{key}: diffusers cannot run {s.name} on this schedule ({type(e).__name__}: {e}); allowed: another "
                "sampler or number of steps"
            ) from None
        if not torch.isfinite(x01).all():
            schedule = "flow matching"
            if not is_flow(config):
                schedule = f"prediction_type {config.prediction_type}, {config.beta_schedule}"
            raise ParamsError(
                f"{key}: {s.name} draws non-finite images on this schedule ({schedule}, {config.num_train_timesteps} "
                "timesteps); allowed: another sampler or fewer steps"
            )
