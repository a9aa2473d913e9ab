"""The judge: a small classifier of the dataset's classes, trained by the pipeline itself on the labelled training
split; the feature extractor behind FID and the judge of recognisable samples. No Inception weights can be downloaded
here, and Inception features fit small images (28x28 digits, a folder converted to 32x32) poorly.

Two 3x3 conv pairs with batch norm and max-pooling, a 128-d penultimate layer (the FID features), one logit per class.
Its shape comes from the dataset (channels, resolution, classes: data.describe), its input standardisation from the
training split (channel_stats: per-channel mean and std, rounded to 4 decimals, which on MNIST are exactly the classic
0.1307 and 0.3081). Those five numbers (`config()`) rebuild it; train-classifier stores them beside the weights, in
models/classifier/config.json, and the weights file holds the weights alone.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

NUM_FEATURES = 128
CONFIG = "config.json"  # beside the weights: what rebuilds the classifier, and the data it was trained on


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )


def channel_stats(images) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 images (N, C, H, W) read as [0, 1], rounded to 4 decimals.

    Counted from each channel's histogram of the 256 byte values: exact in float64, and no float copy of the split.
    Raises ValueError for a channel with std 0 after rounding (every pixel (nearly) one value: nothing to standardise).
    """
    x = np.asarray(images)
    if x.dtype != np.uint8 or x.ndim != 4 or not len(x):
        raise ValueError(f"channel_stats: got {x.dtype} images of shape {x.shape}; allowed: uint8 (N, C, H, W), N > 0")
    values = np.arange(256) / 255
    mean, std = [], []
    for c in range(x.shape[1]):
        p = np.bincount(x[:, c].ravel(), minlength=256) / x[:, c].size  # share of pixels at each byte value
        m = float(p @ values)
        mean.append(round(m, 4))
        std.append(round(float(np.sqrt(p @ (values - m) ** 2)), 4))
    if 0.0 in std:
        raise ValueError(
            f"channel_stats: channel {std.index(0.0)} has std 0 (to 4 decimals): every pixel is about "
            f"{mean[std.index(0.0)]:.4f}; allowed: images that vary"
        )
    return tuple(mean), tuple(std)


class Classifier(nn.Module):
    """`Classifier(**config)` for a config as `config()` returns it."""

    def __init__(
        self, channels: int, resolution: int, num_classes: int, mean: Sequence[float], std: Sequence[float]
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(
                f"num_classes: got {num_classes}; allowed: 1 or more (an unlabelled dataset has no classifier)"
            )
        if resolution < 4:
            raise ValueError(f"resolution: got {resolution}; allowed: 4 or more (two 2x poolings)")
        if len(mean) != channels or len(std) != channels or min(std) <= 0:
            raise ValueError(
                f"mean, std: got {list(mean)}, {list(std)}; allowed: one value per channel ({channels}), std > 0"
            )
        self.channels, self.resolution, self.num_classes = channels, resolution, num_classes
        # Python floats, not buffers: the weights file holds the weights alone (as MnistClassifier's did), and a scalar
        # subtraction and division per channel computes what MnistClassifier's constants did, bit for bit, in float32
        # and float64 alike (a tensor's float32 copy would shift the float64 features behind FID).
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        side = resolution // 4  # two 2x max-poolings, each rounding down: 28 -> 14 -> 7
        self.body = nn.Sequential(_block(channels, 32), _block(32, 64), nn.Flatten())  # (B, 64 * side * side)
        self.head = nn.Sequential(nn.Linear(64 * side * side, NUM_FEATURES), nn.ReLU())
        self.dropout = nn.Dropout(0.3)
        self.logits = nn.Linear(NUM_FEATURES, num_classes)

    def config(self) -> dict:
        """What rebuilds it: `Classifier(**config)`."""
        return {
            "channels": self.channels,
            "resolution": self.resolution,
            "num_classes": self.num_classes,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    def standardise(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [0, 1] -> per channel (x - mean) / std: callers pass plain [0, 1] images."""
        channels = [(x[:, c : c + 1] - m) / s for c, (m, s) in enumerate(zip(self.mean, self.std, strict=True))]
        return torch.cat(channels, 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) in [0, 1] -> penultimate features (B, 128)."""
        return self.head(self.body(self.standardise(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(self.dropout(self.features(x)))


class FeatureExtractor(nn.Module):
    """The classifier's penultimate layer in the form torchmetrics' FID expects (uint8 or [0, 1] images in)."""

    num_features = NUM_FEATURES

    def __init__(self, classifier: Classifier):
        super().__init__()
        # A copy: torchmetrics' set_dtype(float64) converts the extractor's weights in place.
        self.classifier = copy.deepcopy(classifier).eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float() / 255
        return self.classifier.features(x.to(self.classifier.logits.weight.dtype))
