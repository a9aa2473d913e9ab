"""Sample-quality metrics measured with the pipeline's own MNIST classifier.

- FID: Frechet distance between Gaussians fitted to the classifier's penultimate features of real test images and
  of samples, computed by torchmetrics (custom feature extractor), in float64, always at equal n. The floor is the
  FID of a disjoint real set of the same size against the same reference.
- recognised: share of samples whose top class probability exceeds 0.9.
- coverage: KL divergence of the predicted-digit histogram from uniform (0 = every digit equally often;
  log 10 = 2.30 = one digit only), and the histogram's entropy in nats.
- memorised: share of samples whose nearest training image (pixel L2) is closer than all but 1% of real test images
  are to theirs; copies of training images score 1.0, real test images about 0.01 by construction.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics.image.fid import FrechetInceptionDistance

from scratch_diffusion.models.classifier import FeatureExtractor, MnistClassifier

RECOGNISED_THRESHOLD = 0.9
MEMORISATION_PERCENTILE = 1.0


def classifier_loss(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


def _as_float(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) or (N, 1, 28, 28) -> float (N, 1, 28, 28) in [0, 1]."""
    x = torch.as_tensor(images)
    if x.ndim == 3:
        x = x.unsqueeze(1)
    return x.float() / 255 if x.dtype == torch.uint8 else x.float()


@torch.inference_mode()
def predict_proba(classifier: MnistClassifier, images, batch_size: int = 1000) -> torch.Tensor:
    classifier.eval()
    x = _as_float(images)
    return torch.cat([classifier(x[i : i + batch_size]).softmax(-1) for i in range(0, len(x), batch_size)])


def accuracy(classifier: MnistClassifier, images, labels: torch.Tensor) -> float:
    return float((predict_proba(classifier, images).argmax(-1) == labels).float().mean())


class FID:
    """FID against a fixed real reference set, reused for every sample set (reference features computed once)."""

    def __init__(self, classifier: MnistClassifier, reference, batch_size: int = 1000):
        self.batch_size = batch_size
        self.n = len(reference)
        self.metric = FrechetInceptionDistance(
            feature=FeatureExtractor(classifier), reset_real_features=False, normalize=True
        ).set_dtype(torch.float64)  # the matrix square root is unstable in float32
        self._update(reference, real=True)

    @torch.inference_mode()
    def _update(self, images, real: bool) -> None:
        x = _as_float(images)
        for i in range(0, len(x), self.batch_size):
            self.metric.update(x[i : i + self.batch_size], real=real)

    def __call__(self, images) -> float:
        if len(images) != self.n:
            raise ValueError(f"FID compares only at equal n: got {len(images)} images, the reference has {self.n}")
        self.metric.reset()  # drops the fake statistics only
        self._update(images, real=False)
        return float(self.metric.compute())


def recognised_share(probs: torch.Tensor, threshold: float = RECOGNISED_THRESHOLD) -> float:
    return float((probs.max(-1).values > threshold).float().mean())


def class_coverage(probs: torch.Tensor, num_classes: int = 10) -> dict[str, float]:
    """KL(predicted-digit histogram || uniform) and the histogram's entropy (nats)."""
    counts = torch.bincount(probs.argmax(-1), minlength=num_classes).double()
    p = counts / counts.sum()
    entropy = float(-(p[p > 0] * p[p > 0].log()).sum())
    return {"coverage_kl": math.log(num_classes) - entropy, "coverage_entropy": entropy}


@torch.inference_mode()
def nearest_distances(images, train_images, chunk: int = 500) -> torch.Tensor:
    """Pixel-space L2 distance from each image to its nearest training image."""
    x = _as_float(images).flatten(1)
    train = _as_float(train_images).flatten(1)
    return torch.cat([torch.cdist(x[i : i + chunk], train).min(-1).values for i in range(0, len(x), chunk)])


def memorisation_threshold(real_test_images, train_images, percentile: float = MEMORISATION_PERCENTILE) -> float:
    """Distance below which only `percentile`% of real test images have their nearest training image."""
    return float(np.percentile(nearest_distances(real_test_images, train_images).numpy(), percentile))


def memorised_share(images, train_images, threshold: float) -> float:
    return float((nearest_distances(images, train_images) < threshold).float().mean())


def sample_metrics(images, classifier, fid: FID, train_images, memorisation_cut: float) -> dict[str, float]:
    """All quality metrics for one sample set (uint8, (N, 28, 28))."""
    probs = predict_proba(classifier, images)
    return {
        "fid": fid(images),
        "recognised": recognised_share(probs),
        **class_coverage(probs),
        "memorised": memorised_share(images, train_images, memorisation_cut),
    }


def conditional_metrics(images, labels, classifier, real_images, real_labels) -> dict:
    """For a class-conditional sample set: the share that the classifier reads as the class asked for, and FID per
    class, against as many real images of that class (a small-n FID: compare classes and scales, not papers)."""
    labels = np.asarray(labels)
    probs = predict_proba(classifier, images)
    accuracy = float((probs.argmax(-1).numpy() == labels).mean())
    real_labels = np.asarray(real_labels)
    per_class = {}
    for c in sorted(set(labels.tolist())):
        mine = images[labels == c]
        real = real_images[real_labels == c][: len(mine)]
        if len(mine) >= 2 and len(real) == len(mine):
            per_class[str(c)] = FID(classifier, real)(mine)
    mean = float(np.mean(list(per_class.values()))) if per_class else None
    return {"cond_accuracy": accuracy, "fid_per_class": per_class, "fid_class_mean": mean}
