"""Saving and loading a trained UNet2DModel in diffusers' format.

`models/unet2d/` is a DDPMPipeline folder (model_index.json, unet/, scheduler/) that
`DDPMPipeline.from_pretrained(path)` loads as is, plus `scratch_diffusion.json` with what diffusers does not
record: the objective, the corruption, the timestep conditioning (a `none`-conditioned model must be called with
t = 0, which DDPMPipeline does not know).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from scratch_diffusion.files import disk_full_reported
from scratch_diffusion.models import UNet2DDenoiser

META = "scratch_diffusion.json"


def save_unet2d(path: str | Path, denoiser: UNet2DDenoiser, scheduler: DDPMScheduler, meta: dict) -> None:
    """Write the model folder atomically (built beside `path`, then renamed onto it), with a model card (README.md)
    that says how to sample it.

    What plain diffusers makes of the folder is decided here, so that it never draws wrong images:
    - DDPM noise: a DDPMPipeline folder. A `none`-conditioned net is saved time-blind (below), so the real t that
      DDPMPipeline feeds changes nothing, as in training; a class-conditional one is refused by diffusers itself
      (DDPMPipeline passes no class labels).
    - toy corruption: no model_index.json, so `DDPMPipeline.from_pretrained` refuses it; its sampler is the lesson's.
    """
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
            (staging / "README.md").write_text(model_card(meta, scheduler.config.prediction_type))
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


def model_card(meta: dict, prediction_type: str) -> str:
    """README.md of a model folder: what the model is and how to draw from it."""
    toy, conditional = meta["corruption"] == "toy", bool(meta.get("class_conditional"))
    recipe = (
        f"objective `{meta['objective']}` (diffusers prediction_type `{prediction_type}`), corruption "
        f"`{meta['corruption']}`, timestep conditioning `{meta['conditioning']}`"
    )
    if conditional:
        recipe += ", class-conditional (digits 0-9; label 10 = no label)"
    if toy:
        ours = "scratch-diffusion generate --model models/unet2d --sampler toy --steps 40"
        plain = (
            "Plain diffusers cannot draw it: it was trained on the lesson's toy corruption (uniform noise mixed in, "
            "pixels in [0, 1]), not DDPM noise, so this folder has no model_index.json and "
            "`DDPMPipeline.from_pretrained` refuses it."
        )
    elif conditional:
        ours = "scratch-diffusion generate --model models/unet2d --sampler ddim --steps 50 --digit 7 --guidance-scale 2"
        plain = (
            "`DDPMPipeline` passes no class labels, so diffusers refuses to run this class-conditional UNet; sample "
            "it with the command above (classifier-free guidance)."
        )
    else:
        ours = "scratch-diffusion generate --model models/unet2d --sampler ddim --steps 50 --eta 1"
        plain = PLAIN_DIFFUSERS
        if meta["conditioning"] == "none":
            plain += (
                "\n\nIt was trained with the time embedding fixed at t = 0; the saved UNet ignores t, so any "
                "scheduler's timesteps give what training saw."
            )
    return (
        f"# UNet2DModel trained by scratch-diffusion\n\nMNIST digits, 28 x 28, one channel: {recipe}; the EMA "
        f"weights.\n\n```bash\n{ours}\n```\n\n{plain}\n"
    )


class ModelFileError(OSError):
    """A model folder whose files cannot be read as a trained model (truncated, corrupt, or not ours)."""


def load_unet2d(path: str | Path, device="cpu") -> tuple[UNet2DDenoiser, DDPMScheduler, dict]:
    """The denoiser (conditioning applied), its training scheduler, and the metadata, from the pipeline folder that
    save_unet2d writes or from the same files side by side (as a logged MLflow model carries them in extra_files).
    Weights load from safetensors only: a folder holding pickled weights is refused rather than unpickled."""
    path = Path(path)
    if not (path / META).is_file():
        raise FileNotFoundError(f"{path}: no trained UNet2DModel here; run `dvc repro train-unet2d` first")
    unet_dir = path / "unet" if (path / "unet").is_dir() else path
    scheduler_dir = path / "scheduler" if (path / "scheduler").is_dir() else path
    try:
        meta = json.loads((path / META).read_text())
        unet = UNet2DModel.from_pretrained(unet_dir, use_safetensors=True).to(device).eval()
        scheduler = DDPMScheduler.from_pretrained(scheduler_dir)
        return UNet2DDenoiser(unet, meta["conditioning"]).eval(), scheduler, meta
    except Exception as e:  # whatever the damage, one message that names the folder
        raise ModelFileError(
            f"{path}: not a readable trained model ({type(e).__name__}: {str(e)[:200]}); "
            "rerun `dvc repro train-unet2d` (or `dvc checkout models/unet2d`)"
        ) from None


def load_basic(path: str | Path, device="cpu"):
    """The BasicUNet saved by train-basic (safetensors state dict)."""
    from safetensors.torch import load_file

    from scratch_diffusion.models import BasicUNet

    weights = Path(path) / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: missing; run `dvc repro train-basic` first")
    net = BasicUNet()
    try:
        net.load_state_dict(load_file(weights))
    except Exception as e:
        raise ModelFileError(
            f"{weights}: not a readable BasicUNet ({type(e).__name__}: {str(e)[:200]}); rerun "
            "`dvc repro train-basic` (or `dvc checkout models/basic`)"
        ) from None
    return net.to(device).eval()
