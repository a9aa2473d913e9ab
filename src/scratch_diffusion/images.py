"""Images and figures: sample grids as uint8 arrays and PNG files."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

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


def captioned(picture: np.ndarray, caption: str, scale: int = 3) -> np.ndarray:
    """A uint8 grid upscaled with nearest neighbours (28-pixel digits become 84 pixels: readable where the MLflow UI
    shows it whole) under a white band with `caption`, e.g. the training step the grid was drawn at."""
    img = Image.fromarray(picture).resize((picture.shape[1] * scale, picture.shape[0] * scale), Image.NEAREST)
    font = ImageFont.load_default(size=max(12, 8 * scale))
    band = font.size + 8
    out = Image.new("L", (img.width, img.height + band), 255)
    out.paste(img, (0, band))
    ImageDraw.Draw(out).text((6, 4), caption, fill=0, font=font)
    return np.asarray(out)


def save_png(path: str | Path, picture: np.ndarray, scale: int = 3) -> None:
    """Save a uint8 picture, upscaled with nearest neighbours so 28x28 digits are visible."""
    img = Image.fromarray(picture)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
