"""Saving and loading trained models: the UNet2DModel in diffusers' format, the BasicUNet as safetensors.

`models/unet2d/` is a DDPMPipeline folder (model_index.json, unet/, scheduler/) that
`DDPMPipeline.from_pretrained(path)` loads as is (diffusers' config holds the image side and channels), plus
`scratch_diffusion.json` with what diffusers does not record: the objective, the corruption, the timestep
conditioning (a `none`-conditioned model must be called with t = 0, which DDPMPipeline does not know) and the
dataset. `models/basic/` is `model.safetensors` plus `scratch_diffusion.json` with the dataset's name, resolution,
channels and classes: the weights alone do not say which image side the network was trained on.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shlex
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from scratch_diffusion.files import atomic_path, disk_full_reported, write_json
from scratch_diffusion.models import UNet2DDenoiser

# diffusers is imported where a UNet2DModel is saved or loaded: importing it takes seconds, and the BasicUNet's
# stage needs none of it.
if TYPE_CHECKING:
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler, UNet2DModel

META = "scratch_diffusion.json"


def save_unet2d(
    path: str | Path, denoiser: UNet2DDenoiser, scheduler: DDPMScheduler | FlowMatchEulerDiscreteScheduler, meta: dict
) -> None:
    """Write the model folder atomically (built beside `path`, then renamed onto it), with a model card (README.md)
    that says how to sample it.

    What plain diffusers makes of the folder is decided here, so that it never draws wrong images:
    - DDPM noise or flow matching: a DDPMPipeline folder (a flow model's scheduler is FlowMatchEulerDiscreteScheduler,
      which DDPMPipeline steps as it steps any scheduler: Euler along the flow). A `none`-conditioned net is saved
      time-blind (below), so the real t that
      DDPMPipeline feeds changes nothing, as in training; a class-conditional one is refused by diffusers itself
      (DDPMPipeline passes no class labels).
    - toy corruption: no model_index.json, so `DDPMPipeline.from_pretrained` refuses it; its sampler is the lesson's.
    """
    from diffusers import DDPMPipeline

    path = Path(path)
    with disk_full_reported(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        # A disk that fills is one DiskFullError naming the folder, raised while the partial copy still takes its
        # space (the check looks for none left); the old folder stays until the new one is whole.
        with disk_full_reported(path):
            unet = _time_blind(denoiser.unet) if denoiser.conditioning == "none" else denoiser.unet
            if meta["corruption"] == "toy":
                unet.save_pretrained(staging / "unet")
                scheduler.save_pretrained(staging / "scheduler")
            else:
                DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(staging)
            (staging / META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
            (staging / "README.md").write_text(model_card(meta, unet.config))
        staging.chmod(0o755)
        if path.exists():
            shutil.rmtree(path)
        os.replace(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _time_blind(unet: UNet2DModel) -> UNet2DModel:
    """A copy whose time embedding is constant at its t = 0 value, whatever t it is given: a `none`-conditioned net
    was trained on t = 0 only. The first linear layer of the embedding gets zero weights and, as bias, its output
    at t = 0, so the network computes what it computed in training for every t."""
    unet = copy.deepcopy(unet)
    layer = unet.time_embedding.linear_1
    with torch.no_grad():
        t0 = unet.time_proj(torch.zeros(1, device=layer.weight.device)).to(layer.weight.dtype)
        layer.bias.copy_(layer(t0)[0])
        layer.weight.zero_()
    return unet


PLAIN_DIFFUSERS = """With plain diffusers (data in [-1, 1]; the scheduler config carries the trained betas and
prediction_type):

```python
from diffusers import DDPMPipeline

images = DDPMPipeline.from_pretrained("models/unet2d")(batch_size=16, num_inference_steps=1000).images
```"""


PLAIN_DIFFUSERS_FLOW = """With plain diffusers (data in [-1, 1]; the scheduler config is diffusers'
FlowMatchEulerDiscreteScheduler, so DDPMPipeline takes Euler steps along the flow):

```python
from diffusers import DDPMPipeline

images = DDPMPipeline.from_pretrained("models/unet2d")(batch_size=16, num_inference_steps=50).images
```"""


def model_card(meta: dict, unet_config) -> str:
    """README.md of a model folder: what the model is and how to draw from it. The image shape and the classes come
    from the UNet's own config (what diffusers will draw), the dataset's name from `meta` where it is recorded."""
    from scratch_diffusion.choices import PREDICTION_TYPES

    toy, conditional = meta["corruption"] == "toy", bool(meta.get("class_conditional"))
    flow = meta["objective"] == "flow"
    side, channels = unet_config.sample_size, unet_config.in_channels
    height, width = (side, side) if isinstance(side, int) else side
    # Folders saved outside the training stages (the ablations, tests) may not record the dataset.
    data = f"`{meta['dataset']}` images" if "dataset" in meta else "Images"
    data += f", {height} x {width}, " + ("one channel (grey)" if channels == 1 else f"{channels} channels (RGB)")
    if flow:
        target = "flow matching: the velocity noise - x0 on the straight path, FlowMatchEulerDiscreteScheduler"
    else:
        target = f"diffusers prediction_type `{PREDICTION_TYPES[meta['objective']]}`"
    recipe = (
        f"objective `{meta['objective']}` ({target}), corruption `{meta['corruption']}`, timestep conditioning "
        f"`{meta['conditioning']}`"
    )
    num_classes = (unet_config.num_class_embeds or 1) - 1
    # The dataset's names for the classes, in label order (older folders record none: their indices stand in).
    recorded = list(meta.get("classes") or [])
    names = recorded if len(recorded) == num_classes else [str(c) for c in range(num_classes)]
    if conditional:
        listed = ", ".join(f"{i} `{name}`" for i, name in enumerate(names))
        recipe += f", class-conditional (labels {listed}; label {num_classes} = no label)"
    if toy:
        ours = "scratch-diffusion generate --model models/unet2d --sampler toy --steps 40"
        plain = (
            "Plain diffusers cannot draw it: it was trained on the lesson's toy corruption (uniform noise mixed in, "
            "pixels in [0, 1]), not DDPM noise, so this folder has no model_index.json and "
            "`DDPMPipeline.from_pretrained` refuses it."
        )
    elif conditional:
        ours = (
            "scratch-diffusion generate --model models/unet2d --sampler ddim --steps 50 "
            f"--class {shlex.quote(names[min(7, num_classes - 1)])} --guidance-scale 2"
        )
        plain = (
            "`DDPMPipeline` passes no class labels, so diffusers refuses to run this class-conditional UNet; sample "
            "it with the command above (classifier-free guidance)."
        )
    else:
        ours = "scratch-diffusion generate --model models/unet2d --sampler ddim --steps 50 --eta 1"
        plain = PLAIN_DIFFUSERS_FLOW if flow else PLAIN_DIFFUSERS
        if meta["conditioning"] == "none":
            plain += (
                "\n\nIt was trained with the time embedding fixed at t = 0; the saved UNet ignores t, so any "
                "scheduler's timesteps give what training saw."
            )
    return (
        f"# UNet2DModel trained by scratch-diffusion\n\n{data}: {recipe}; the EMA "
        f"weights.\n\n```bash\n{ours}\n```\n\n{plain}\n"
    )


class ModelFileError(OSError):
    """A model folder whose files cannot be read as a trained model (truncated, corrupt, or not ours)."""


def load_unet2d(
    path: str | Path, device="cpu"
) -> tuple[UNet2DDenoiser, DDPMScheduler | FlowMatchEulerDiscreteScheduler, dict]:
    """The denoiser (conditioning applied), its training scheduler, and the metadata, from the pipeline folder that
    save_unet2d writes or from the same files side by side (as a logged MLflow model carries them in extra_files).
    Weights load from safetensors only: a folder holding pickled weights is refused rather than unpickled."""
    import diffusers
    from diffusers import UNet2DModel

    path = Path(path)
    if not (path / META).is_file():
        raise FileNotFoundError(f"{path}: no trained UNet2DModel here; run `dvc repro train-unet2d` first")
    unet_dir = path / "unet" if (path / "unet").is_dir() else path
    scheduler_dir = path / "scheduler" if (path / "scheduler").is_dir() else path
    try:
        meta = json.loads((path / META).read_text())
        scheduler_class = check_scheduler_class(scheduler_dir, meta)
        with _diffusers_quiet():  # what disagrees is said in one line below, not as diffusers' list of names
            unet, loading = UNet2DModel.from_pretrained(unet_dir, use_safetensors=True, output_loading_info=True)
        scheduler = getattr(diffusers, scheduler_class).from_pretrained(scheduler_dir)
        check_unet2d_folder(unet_dir, scheduler_dir, unet.config, loading, scheduler.config, meta)
        return UNet2DDenoiser(unet.to(device).eval(), meta["conditioning"]).eval(), scheduler, meta
    except ModelFileError:
        raise
    except Exception as e:  # whatever the damage, one message that names the folder
        raise ModelFileError(
            f"{path}: not a readable trained model ({type(e).__name__}: {str(e)[:200]}); "
            "rerun `dvc repro train-unet2d` (or `dvc checkout models/unet2d`)"
        ) from None


@contextlib.contextmanager
def _diffusers_quiet():
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


def scheduler_class(objective: str) -> str:
    """The diffusers scheduler a model folder of `objective` holds: flow matching's path, or DDPM's noise schedule."""
    return "FlowMatchEulerDiscreteScheduler" if objective == "flow" else "DDPMScheduler"


def check_scheduler_class(scheduler_dir: Path, meta: dict) -> str:
    """The scheduler class the folder's scheduler_config.json names, when it is the one its objective needs;
    ModelFileError otherwise (sampled on the other process, every image would be wrong)."""
    config = scheduler_dir / "scheduler_config.json"
    declared = json.loads(config.read_text()).get("_class_name")
    objective = meta.get("objective", "x0")
    wanted = scheduler_class(objective)
    if declared != wanted:
        raise ModelFileError(
            f"{config}: _class_name {declared!r}, but {META} says objective {objective!r} ({wanted}); sampled with "
            "it, every image would be wrong"
        )
    return wanted


def check_unet2d_folder(unet_dir: Path, scheduler_dir: Path, unet_config, loading: dict, scheduler_config, meta):
    """The files of a UNet2DModel folder agree with each other and with its scratch_diffusion.json, or ModelFileError
    names what disagrees and in which file: diffusers itself only warns of weights its config has no place for (a
    config that lost its attention blocks) and draws with any prediction_type the scheduler config says."""
    from scratch_diffusion.choices import PREDICTION_TYPES

    weights = unet_dir / "diffusion_pytorch_model.safetensors"
    said = {
        "unexpected_keys": "{} of its weights have no place in the network the config builds",
        "missing_keys": "the network the config builds needs {} weights it lacks",
        "mismatched_keys": "{} of its weights differ in shape from the network the config builds",
    }
    for key, why in said.items():
        found = sorted(k if isinstance(k, str) else k[0] for k in loading.get(key) or [])
        if found:
            raise ModelFileError(
                f"{unet_dir / 'config.json'}: disagrees with {weights.name}: {why.format(len(found))} (first: "
                f"{found[0]}); the folder's files are not one model's"
            )
    shape = {
        "channels": ("in_channels", unet_config.in_channels),
        "resolution": ("sample_size", unet_config.sample_size),
    }
    for key, (field, value) in shape.items():
        if key in meta and value != meta[key]:
            raise ModelFileError(
                f"{unet_dir / 'config.json'}: {field} {value!r}, but {META} says {key} {meta[key]!r}; the folder's "
                "files are not one model's"
            )
    if "class_conditional" in meta:
        # One embedding per class and one for "no label"; none for an unconditional model. Folders that do not
        # record their classes are checked for having embeddings at all.
        embeds, recorded = unet_config.num_class_embeds, meta.get("classes") or []
        if not meta["class_conditional"]:
            agrees, allowed = embeds is None, "null"
        else:
            agrees = embeds == len(recorded) + 1 if recorded else embeds is not None
            allowed = str(len(recorded) + 1) if recorded else "a number"
        if not agrees:
            conditional = "class_conditional true" if meta["class_conditional"] else "class_conditional false"
            raise ModelFileError(
                f"{unet_dir / 'config.json'}: num_class_embeds {embeds!r}, but {META} says {conditional} with "
                f"{len(recorded)} classes (allowed: {allowed}); the folder's files are not one model's"
            )
    if meta.get("objective") in PREDICTION_TYPES:  # a flow model's scheduler has no prediction_type
        wanted = PREDICTION_TYPES[meta["objective"]]
        if scheduler_config.prediction_type != wanted:
            raise ModelFileError(
                f"{scheduler_dir / 'scheduler_config.json'}: prediction_type {scheduler_config.prediction_type!r}, "
                f"but {META} says objective {meta['objective']!r} (prediction_type {wanted!r}); sampled with it, "
                "every image would be wrong"
            )


def save_basic(path: str | Path, net, meta: dict) -> None:
    """The BasicUNet's folder: its weights (safetensors) and `meta`, which must say the data's `resolution` and
    `channels` (the shape load_basic rebuilds it with)."""
    from safetensors.torch import save_file

    missing = [k for k in ("resolution", "channels") if k not in meta]
    if missing:
        raise ValueError(
            f"save_basic: meta lacks {', '.join(missing)}; it must record the data's resolution and channels "
            "(recipe.dataset_meta)"
        )
    path = Path(path)
    with atomic_path(path / "model.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp))
    write_json(path / META, meta)


def load_basic(path: str | Path, device="cpu"):
    """The BasicUNet saved by train-basic (safetensors state dict), shaped as its scratch_diffusion.json says."""
    from safetensors.torch import load_file

    from scratch_diffusion.models import BasicUNet

    weights = Path(path) / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: missing; run `dvc repro train-basic` first")
    meta_file = Path(path) / META
    if not meta_file.is_file():  # the weights alone do not say the image side and channels it was trained on
        raise ModelFileError(f"{meta_file}: missing; rerun `dvc repro train-basic` (or `dvc checkout models/basic`)")
    try:
        meta = json.loads(meta_file.read_text())
        channels = int(meta["channels"])
        net = BasicUNet(channels, channels, sample_size=int(meta["resolution"]))
        net.load_state_dict(load_file(weights))
    except Exception as e:
        raise ModelFileError(
            f"{weights}: not a readable BasicUNet ({type(e).__name__}: {str(e)[:200]}); rerun "
            "`dvc repro train-basic` (or `dvc checkout models/basic`)"
        ) from None
    return net.to(device).eval()
