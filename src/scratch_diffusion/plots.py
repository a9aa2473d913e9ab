"""Images and figures: sample grids as uint8 arrays and PNG files."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from scratch_diffusion.files import atomic_path


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Images in [0, 1], (N, 1, H, W) -> uint8 (N, H, W). Values outside [0, 1] are clipped."""
    return (x.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)[:, 0].cpu().numpy()


def grid(images: np.ndarray, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """uint8 (N, H, W) -> one uint8 (rows*(H+pad)+pad, cols*(W+pad)+pad) picture, grey padding."""
    n, h, w = images.shape
    cols = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad), 128, dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        out[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = img
    return out


def save_png(path: str | Path, picture: np.ndarray, scale: int = 3) -> None:
    """Save a uint8 picture, upscaled with nearest neighbours so 28x28 digits are visible."""
    img = Image.fromarray(picture)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
