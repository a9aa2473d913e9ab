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


def load_unet2d(path: str | Path, device="cpu") -> tuple[UNet2DDenoiser, DDPMScheduler, dict]:
    """The denoiser (conditioning applied), its training scheduler, and the metadata."""
    path = Path(path)
    if not (path / META).is_file():
        raise FileNotFoundError(f"{path}: no trained UNet2DModel here; run `dvc repro train-unet2d` first")
    meta = json.loads((path / META).read_text())
    unet = UNet2DModel.from_pretrained(path / "unet").to(device).eval()
    scheduler = DDPMScheduler.from_pretrained(path / "scheduler")
    return UNet2DDenoiser(unet, meta["conditioning"]).eval(), scheduler, meta


def load_basic(path: str | Path, device="cpu"):
    """The BasicUNet saved by train-basic (safetensors state dict)."""
    from safetensors.torch import load_file

    from scratch_diffusion.models import BasicUNet

    weights = Path(path) / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: missing; run `dvc repro train-basic` first")
    net = BasicUNet()
    net.load_state_dict(load_file(weights))
    return net.to(device).eval()
