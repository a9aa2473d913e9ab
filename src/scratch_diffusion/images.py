"""Images and figures: sample grids as uint8 arrays and PNG files.

Two layouts, the ones PIL and numpy image code read: (H, W) for one channel (grey, PIL mode "L") and (H, W, 3) for
three (RGB); a batch adds a leading N. Every function here takes either and keeps it.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from scratch_diffusion.files import atomic_path

CHANNELS = (1, 3)  # grey, RGB


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Images in [0, 1], (N, C, H, W) -> uint8 (N, H, W) for C = 1, (N, H, W, 3) for C = 3. Values outside [0, 1] are
    clipped."""
    if x.ndim != 4 or x.shape[1] not in CHANNELS:
        raise ValueError(f"to_uint8: got images of shape {tuple(x.shape)}; allowed: (N, 1, H, W) or (N, 3, H, W)")
    pixels = (x.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    pixels = pixels[:, 0] if x.shape[1] == 1 else pixels.permute(0, 2, 3, 1)  # channels last, as PIL reads RGB
    return pixels.contiguous().cpu().numpy()


def grid(images: np.ndarray, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """uint8 (N, H, W) or (N, H, W, 3) -> one uint8 (rows*(H+pad)+pad, cols*(W+pad)+pad[, 3]) picture, grey
    padding."""
    if images.dtype != np.uint8 or not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)):
        raise ValueError(
            f"grid: got {images.dtype} images of shape {images.shape}; allowed: uint8 (N, H, W) or (N, H, W, 3)"
        )
    n, h, w = images.shape[:3]
    cols = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, *images.shape[3:]), 128, dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        out[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = img
    return out


def class_columns(n_classes: int, n: int) -> int:
    """Columns of a grid of `n` images whose labels cycle through `n_classes` classes: a multiple of n_classes near
    10 (10 for MNIST's digits), so that each column holds one class; one row where there are fewer images."""
    return min(n, n_classes * max(1, min(10, n) // n_classes))


def captioned(picture: np.ndarray, caption: str, scale: int = 3) -> np.ndarray:
    """A uint8 grid, (H, W) or (H, W, 3), upscaled with nearest neighbours (28-pixel digits become 84 pixels:
    readable where the MLflow UI shows it whole) under a white band with `caption`, e.g. the training step the grid
    was drawn at. Grey in, grey ("L") out; RGB in, RGB out."""
    img = _image(picture)
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    font = ImageFont.load_default(size=max(12, 8 * scale))
    band = font.size + 8
    out = Image.new(img.mode, (img.width, img.height + band), "white")
    out.paste(img, (0, band))
    ImageDraw.Draw(out).text((6, 4), caption, fill="black", font=font)
    return np.asarray(out)


def save_png(path: str | Path, picture: np.ndarray, scale: int = 3) -> None:
    """Save a uint8 picture, (H, W) grey or (H, W, 3) RGB, upscaled with nearest neighbours so that small images
    (28 x 28 digits) are visible."""
    img = _image(picture)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def _image(picture: np.ndarray) -> Image.Image:
    """A uint8 (H, W) or (H, W, 3) array as a PIL image of mode "L" or "RGB"."""
    if picture.dtype != np.uint8 or not (picture.ndim == 2 or (picture.ndim == 3 and picture.shape[-1] == 3)):
        raise ValueError(
            f"picture: got {picture.dtype} of shape {picture.shape}; allowed: uint8 (H, W) grey or (H, W, 3) RGB"
        )
    return Image.fromarray(picture)  # uint8 (H, W) reads as mode "L", (H, W, 3) as "RGB"
