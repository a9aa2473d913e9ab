"""Saving and loading a trained UNet2DModel in diffusers' format.

`models/unet2d/` is a DDPMPipeline folder (model_index.json, unet/, scheduler/) that
`DDPMPipeline.from_pretrained(path)` loads as is, plus `scratch_diffusion.json` with what diffusers does not
record: the objective, the corruption, the timestep conditioning (a `none`-conditioned model must be called with
t = 0, which DDPMPipeline does not know).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from scratch_diffusion.models import UNet2DDenoiser

META = "scratch_diffusion.json"


def save_unet2d(path: str | Path, denoiser: UNet2DDenoiser, scheduler: DDPMScheduler, meta: dict) -> None:
    """Write the pipeline folder atomically (built beside `path`, then renamed onto it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        DDPMPipeline(unet=denoiser.unet, scheduler=scheduler).save_pretrained(staging)
        (staging / META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        staging.chmod(0o755)
        if path.exists():
            shutil.rmtree(path)
        os.replace(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


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
        raise ModelFileError(f"{path}: not a readable trained model ({type(e).__name__}: {str(e)[:200]}); "
                             "rerun `dvc repro train-unet2d` (or `dvc checkout models/unet2d`)") from None  # fmt: skip


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
        raise ModelFileError(f"{weights}: not a readable BasicUNet ({type(e).__name__}: {str(e)[:200]}); rerun "
                             "`dvc repro train-basic` (or `dvc checkout models/basic`)") from None  # fmt: skip
    return net.to(device).eval()
