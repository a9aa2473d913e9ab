"""A small MNIST classifier, trained by the pipeline itself: the feature extractor behind FID and the judge of
recognisable digits. No Inception weights can be downloaded here, and Inception features fit 28x28 digits poorly.

Two 3x3 conv pairs with batch norm and max-pooling, a 128-d penultimate layer (the FID features), 10 logits.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

NUM_FEATURES = 128


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


class MnistClassifier(nn.Module):
    # MNIST pixel mean and std: inputs are standardised inside, so callers pass plain [0, 1] images.
    MEAN, STD = 0.1307, 0.3081

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(_block(1, 32), _block(32, 64), nn.Flatten())  # (B, 64 * 7 * 7)
        self.head = nn.Sequential(nn.Linear(64 * 7 * 7, NUM_FEATURES), nn.ReLU())
        self.dropout = nn.Dropout(0.3)
        self.logits = nn.Linear(NUM_FEATURES, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 1, 28, 28) in [0, 1] -> penultimate features (B, 128)."""
        return self.head(self.body((x - self.MEAN) / self.STD))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(self.dropout(self.features(x)))


class FeatureExtractor(nn.Module):
    """The classifier's penultimate layer in the form torchmetrics' FID expects (uint8 or [0, 1] images in)."""

    num_features = NUM_FEATURES

    def __init__(self, classifier: MnistClassifier):
        super().__init__()
        # A copy: torchmetrics' set_dtype(float64) converts the extractor's weights in place.
        self.classifier = copy.deepcopy(classifier).eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float() / 255
        return self.classifier.features(x.to(self.classifier.logits.weight.dtype))
