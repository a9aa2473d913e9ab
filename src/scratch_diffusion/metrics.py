"""Sample-quality metrics measured with the pipeline's own classifier of the dataset's classes (models.classifier),
each with its 95% interval. Images come as uint8 (N, H, W) grey, (N, C, H, W), or (N, H, W, 3) channel-last RGB as
the samplers write them (as_nchw).

- FID: Frechet distance between Gaussians fitted to the classifier's penultimate features (float64) of real test
  images and of samples (torchmetrics' formula), always at equal n. The floor is the FID of a disjoint real set of the
  same size against the same reference. Biased by n: compare FIDs at equal n only.
- KID: the unbiased polynomial-kernel MMD on the same features (torchmetrics' kernel), averaged over random subsets
  of n / 2 from each side; comparable across sample counts.
- recognised: share of samples whose top class probability exceeds 0.9.
- coverage: KL divergence of the predicted-class histogram from uniform (0 = every class equally often;
  log K = one class only, of K; log 10 = 2.30 on MNIST), and the histogram's entropy in nats.
- memorised: share of samples whose nearest training image (pixel L2) is closer than all but 1% of real test images
  are to theirs; copies of training images score 1.0, real test images about 0.01 by construction.

Intervals: FID, recognised, coverage and memorised are bootstrapped over the sample set (the reference stays
fixed: every setting is measured against the same one), centred on the measured value; KID's is the spread of its
subset estimates (of n / 2 each: wider than the interval of their mean, so a KID verdict is cautious). `verdict`
calls one set better than another only where the 95% interval of their difference excludes zero.

An unlabelled dataset has no classifier. Given the weights file of the FID Inception-v3 (params'
classifier.inception_weights), its Judge measures FID and KID as above on Inception's 2048 pool features
(InceptionFeatures: torchmetrics' FID network), recognised and coverage are None (they need classes); without it, the
Judge measures memorisation alone (pixel distances need no features), and FID and KID are None too.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from scratch_diffusion.data import DataError, dataset_digest, describe, load_split, sha256_file
from scratch_diffusion.models.classifier import CONFIG, Classifier

RECOGNISED_THRESHOLD = 0.9
MEMORISATION_PERCENTILE = 1.0
RESAMPLES = 200  # bootstrap resamples behind each interval (and KID subsets)
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Metric:
    """One number that compare reports per sample set, declared once: the judge's intervals and verdicts, the
    report's table (compare_report) and metrics/compare.json (the compare stage) all read it from here."""

    key: str  # its name in the judge's output and the report's rows; `{key}_lo`, `{key}_hi`: its 95% interval
    title: str | None = None  # the report's column title; None: not in the table
    fmt: str = "{}"  # the table's format, of the value and of its interval
    lower_is_better: bool | None = None  # None: no direction (a verdict on it raises)
    bounds: tuple[float, float] = (-math.inf, math.inf)  # the values it can take: a shifted interval is clipped to them
    conditional: bool = False  # class-conditional sets only: its column appears when some set is one
    to_json: bool = True  # in metrics/compare.json's `settings`, which `dvc exp show` lists
    json_interval: bool = True  # its interval goes there too (else only the report shows it)


# Every number compare reports per sample set, in the report's column order: the judge's metrics and, beside them,
# the setting's own (NFE, guidance scale, seconds per image) and FID's verdict against the best setting.
SHARE, NON_NEGATIVE = (0.0, 1.0), (0.0, math.inf)  # KID has neither: it is unbiased, its estimate can go below 0
METRICS = (
    Metric("nfe", "NFE"),
    Metric("guidance_scale", "guidance", "{:g}", conditional=True),
    Metric("cond_accuracy", "cond. accuracy [95%]", "{:.3f}", lower_is_better=False, bounds=SHARE, conditional=True),
    Metric("fid_class_mean", "FID per class (mean)", "{:.2f}", lower_is_better=True, conditional=True),
    Metric("fid_per_class", conditional=True, to_json=False),  # {class name: FID}; the table shows their mean
    Metric("cond_accuracy_per_class", conditional=True, to_json=False),  # {class name: share read as asked}
    Metric("fid", "FID [95%]", "{:.2f}", lower_is_better=True, bounds=NON_NEGATIVE),
    Metric("verdict", "FID vs best"),  # best / within noise / worse: set by compare_report.summarise
    Metric("kid", "KID [95%]", "{:.3g}", lower_is_better=True),
    Metric("recognised", "recognised [95%]", "{:.3f}", lower_is_better=False, bounds=SHARE),
    Metric("coverage_kl", "coverage KL", "{:.3f}", lower_is_better=True, bounds=NON_NEGATIVE, json_interval=False),
    Metric("coverage_entropy", to_json=False),  # nats: log K - coverage_kl, the same fact
    Metric("memorised", "memorised", "{:.3f}", lower_is_better=True, bounds=SHARE, json_interval=False),
    Metric("seconds_per_image", "s / image", "{:.4f}", lower_is_better=True),
)
BY_KEY = {m.key: m for m in METRICS}
# What a classifier measures: None for a judge without one (an unlabelled dataset), but FID and KID where the judge
# has Inception's features instead.
NEEDS_CLASSIFIER = ("fid", "kid", "recognised", "coverage_kl", "coverage_entropy")


class JudgeError(DataError):
    """The classifier's files (or the Inception weights named in its place) are missing, or were written for other
    data; the message says which and what to do. A DataError, so that a stage prints it as one line."""


def lower_is_better(key: str) -> bool:
    direction = BY_KEY[key].lower_is_better if key in BY_KEY else None
    if direction is None:
        allowed = [m.key for m in METRICS if m.lower_is_better is not None]
        raise ValueError(f"no verdict on {key!r}: it has no better direction (allowed: {allowed})")
    return direction


def as_nchw(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Images in the layout the classifier and the pixel distances take, (N, C, H, W): from (N, H, W) grey,
    (N, C, H, W), or (N, H, W, 3) channel-last RGB as the samplers write them (told apart by a last axis of 3 where
    the second is not: images are at least 4 pixels wide). The one place the layouts meet: flattened, a channel-last
    sample and an (N, C, H, W) training image would compare each pixel with another."""
    x = torch.as_tensor(images)
    if x.ndim == 3:
        return x.unsqueeze(1)
    if x.ndim == 4 and x.shape[-1] == 3 and x.shape[1] != 3:
        return x.permute(0, 3, 1, 2).contiguous()
    if x.ndim != 4:
        raise ValueError(f"images: got shape {tuple(x.shape)}; allowed: (N, H, W), (N, C, H, W) or (N, H, W, 3)")
    return x


def _as_float(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (or [0, 1] float) images in any layout as_nchw takes -> float (N, C, H, W) in [0, 1]."""
    x = as_nchw(images)
    return x.float() / 255 if x.dtype == torch.uint8 else x.float()


@torch.inference_mode()
def predict_proba(classifier: Classifier, images, batch_size: int = 1000) -> torch.Tensor:
    classifier.eval()
    x = _as_float(images)
    return torch.cat([classifier(x[i : i + batch_size]).softmax(-1) for i in range(0, len(x), batch_size)])


def accuracy(classifier: Classifier, images, labels: torch.Tensor) -> float:
    return float((predict_proba(classifier, images).argmax(-1) == labels).float().mean())


def recognised_share(probs: torch.Tensor, threshold: float = RECOGNISED_THRESHOLD) -> float:
    return float((probs.max(-1).values > threshold).float().mean())


def class_coverage(probs: torch.Tensor, num_classes: int) -> dict[str, float]:
    """KL(predicted-class histogram || uniform over `num_classes`) and the histogram's entropy (nats)."""
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


def _interval(replicates: np.ndarray, point: float | None = None, key: str = "") -> tuple[float, float]:
    """The central 95% of the replicates; with `point`, first shifted so that their mean is the point. FID's
    bootstrap needs that: a resample repeats images, fewer distinct ones raise FID's small-sample bias, and the plain
    percentiles would sit above the measured value. The shift can cross a bound of metric `key`; it is clipped (no
    key, as for a difference: unbounded)."""
    replicates = np.asarray(replicates, float)
    if point is not None:
        replicates = replicates - (replicates.mean() - point)
    tail = 100 * (1 - CONFIDENCE) / 2
    bounds = BY_KEY[key].bounds if key else (-math.inf, math.inf)
    lo, hi = np.clip(np.percentile(replicates, [tail, 100 - tail]), *bounds)
    return float(lo), float(hi)


@torch.inference_mode()
def features(classifier: Classifier, images, batch_size: int = 1000) -> torch.Tensor:
    """The classifier's penultimate features (N, 128), computed in float64 (the matrix square root behind FID is
    unstable in float32)."""
    net = copy.deepcopy(classifier).double().eval()
    x = _as_float(images).double()
    return torch.cat([net.features(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


class InceptionFeatures:
    """Inception-v3's 2048 pool features (N, 2048) in float64, as torchmetrics' FrechetInceptionDistance extracts them
    (torch-fidelity's network; every image resized to 299 x 299 inside), with the weights from the file `weights`:
    the FID yardstick of an unlabelled dataset, which has no classifier. `digest` (the file's sha256, 16 hex digits)
    names the scale. Images as as_nchw takes them, uint8; grey ones repeated to 3 channels (Inception reads RGB)."""

    def __init__(self, weights: str | Path, device: str | None = None):
        # Without torch-fidelity (its network) the constructor below raises ModuleNotFoundError, naming it.
        from torchmetrics.image.fid import FrechetInceptionDistance

        self.weights = Path(weights).expanduser()
        self.digest = sha256_file(self.weights)[:16]
        # torch-fidelity reads the file with a full unpickler, which runs whatever code a pickle names. Read it first
        # the safe way: a file of plain tensors (the published weights are one) passes, anything else stops here.
        try:
            torch.load(self.weights, map_location="cpu", weights_only=True)
        except Exception as e:
            why = " ".join(str(e).split())[:120]
            raise JudgeError(
                f"{self.weights}: refused, not a plain file of weights: loading it could run code ({type(e).__name__}: "
                f"{why})"
            ) from None
        # A GPU where there is one: the network costs about 6 GFLOPs per image, 10^4 times the classifier's.
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        # normalize=False: uint8 in [0, 255] as the samplers write them. Only the metric's network is kept: FID and
        # KID are computed here from the features, so that their bootstrap resamples features, not images.
        fid = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(self.weights), normalize=False)
        self.net = fid.inception.to(self.device).eval()

    @torch.inference_mode()
    def __call__(self, images, batch_size: int = 50) -> torch.Tensor:
        x = as_nchw(images)
        if x.dtype != torch.uint8:
            raise ValueError(f"Inception features: got images of dtype {x.dtype}; allowed: uint8 in [0, 255]")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # (N, 3, H, W): grey as RGB
        batches = (x[i : i + batch_size].to(self.device) for i in range(0, len(x), batch_size))
        return torch.cat([self.net(b).double().cpu() for b in batches])


def gaussian(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return f.mean(0), torch.cov(f.T)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), as torchmetrics computes it."""
    root = torch.linalg.eigvals(sigma1 @ sigma2).sqrt().real.sum()
    return float((mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * root)


def frechet_distance_of_features(f1: torch.Tensor, f2: torch.Tensor) -> float:
    """frechet_distance between the Gaussians fitted to features f1 (N1, d) and f2 (N2, d), without the (d, d)
    eigenproblem: with sigma = A^T A (A: the centred features over sqrt(N - 1)), the non-zero eigenvalues of
    sigma1 sigma2 are the squared singular values of A1 A2^T, so Tr (sigma1 sigma2)^(1/2) is that (N1, N2) matrix's
    nuclear norm. Exact; for Inception's d = 2048 at N = 1000 about 1 s where eigvals takes 10 or more."""
    a1 = (f1 - f1.mean(0)) / math.sqrt(len(f1) - 1)
    a2 = (f2 - f2.mean(0)) / math.sqrt(len(f2) - 1)
    root = torch.linalg.svdvals(a1 @ a2.T).sum()
    mean_term = (f1.mean(0) - f2.mean(0)).square().sum()
    return float(mean_term + a1.square().sum() + a2.square().sum() - 2 * root)


def kid_subsets(f_real: torch.Tensor, f_fake: torch.Tensor, subsets: int, size: int, seed: int = 0) -> np.ndarray:
    """KID (unbiased MMD^2, cubic polynomial kernel) on `subsets` random subsets of `size` from each side."""
    # Imported here: torchmetrics takes seconds to import, and every stage that checks or trains imports this module.
    from torchmetrics.image.kid import poly_mmd

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(subsets):
        real = f_real[torch.randperm(len(f_real), generator=g)[:size]]
        fake = f_fake[torch.randperm(len(f_fake), generator=g)[:size]]
        out.append(float(poly_mmd(real, fake)))
    return np.array(out)


class Judge:
    """compare's yardstick, built once and used by every caller that measures samples (the compare stage and the
    ablation scripts): the classifier, n real test images as the reference, the next n as the real-data floor, the
    memorisation cut from those, and the real images' recognised share.

    `measure(images)` returns every metric with its 95% interval (`fid`, `fid_lo`, `fid_hi`, ...) and, under
    `replicates`, the bootstrap values that `verdict` compares. Every resample is seeded: the same images give the
    same numbers.

    Without a classifier (`classifier=None`, `no_classifier` saying why: an unlabelled dataset) it measures FID, KID
    and the floor on the features of `inception` (InceptionFeatures) where it is given, and memorisation; recognised,
    coverage and the real recognised share are None (they need classes). Without either, it measures memorisation
    alone: everything of NEEDS_CLASSIFIER and the floor are None.
    """

    def __init__(
        self,
        classifier: Classifier | None,
        test_images,
        train_images,
        n: int,
        resamples: int = RESAMPLES,
        no_classifier: str | None = None,
        inception: InceptionFeatures | None = None,
    ):
        if 2 * n > len(test_images):
            raise ValueError(
                f"sample.n: got {n}; the judge needs 2 * n real test images (allowed: n <= {len(test_images) // 2})"
            )
        if (classifier is None) != (no_classifier is not None):
            raise ValueError("Judge: give a classifier, or none and `no_classifier` saying why there is none")
        if classifier is not None and inception is not None:
            raise ValueError("Judge: give a classifier or Inception features, not both: one FID scale per judge")
        self.classifier = classifier.eval() if classifier is not None else None
        self.no_classifier = no_classifier
        self.inception = inception
        # The one place that decides what FID and KID are measured on: the classifier's penultimate features, else
        # Inception's (an unlabelled dataset whose params name its weights), else nothing.
        self.extract = partial(features, classifier) if classifier is not None else inception
        self.n, self.resamples = n, resamples
        self.train_images = train_images
        reference, held_out = test_images[:n], test_images[n : 2 * n]
        self.memorisation_cut = memorisation_threshold(held_out, train_images)
        self.reference_features = self.reference = self.floor = self.real_recognised = None
        if self.extract is not None:
            self.reference_features = self.extract(reference)
            if inception is None:
                self.reference = gaussian(self.reference_features)
            self.floor = self.fid(held_out)
        if classifier is not None:
            self.real_recognised = recognised_share(predict_proba(classifier, held_out))

    @classmethod
    def from_files(
        cls,
        classifier_file: str | Path,
        data_root: str | Path,
        n: int,
        inception_weights: str | Path | None = None,
        **kwargs,
    ) -> Judge:
        """The judge that train-classifier left: its weights (`classifier_file`) and, beside them, config.json (what
        rebuilds the classifier, the data it was trained on, or why there is none), for the dataset at `data_root`.
        Where there is none, Inception's features from `inception_weights` (classifier.inception_weights; ignored
        beside a classifier) measure FID and KID. Raises JudgeError (one line) when the config is missing or was
        written for other data, or the Inception weights file is missing."""
        classifier_file = Path(classifier_file)
        config = read_config(classifier_file.with_name(CONFIG), data_root)
        test_images, _ = load_split(data_root, train=False)
        train_images, _ = load_split(data_root, train=True)
        if not config["judge"]:
            inception = None
            if inception_weights:
                if not Path(inception_weights).expanduser().is_file():
                    raise JudgeError(
                        f"classifier.inception_weights: {inception_weights}: no such file (the FID Inception-v3 "
                        "weights); restore it, or set classifier.inception_weights to '' for no FID"
                    )
                inception = InceptionFeatures(inception_weights)
            reason = config["reason"]
            return cls(None, test_images, train_images, n, no_classifier=reason, inception=inception, **kwargs)
        if not classifier_file.is_file():
            raise JudgeError(f"{classifier_file}: missing beside its {CONFIG}; run `dvc repro train-classifier`")
        classifier = Classifier(**{k: config[k] for k in ("channels", "resolution", "num_classes", "mean", "std")})
        classifier.load_state_dict(load_file(str(classifier_file)))
        return cls(classifier, test_images, train_images, n, **kwargs)

    def _classifier(self, what: str) -> Classifier:
        if self.classifier is None:
            raise ValueError(f"{what} needs a classifier, and this judge has none: {self.no_classifier}")
        return self.classifier

    def _fid(self, f: torch.Tensor) -> float:
        """FID of features `f` against the reference's."""
        if self.inception is not None:  # 2048 features, more than images: the (N, N) form, exact and fast
            return frechet_distance_of_features(f, self.reference_features)
        return frechet_distance(*gaussian(f), *self.reference)

    def fid(self, images) -> float:
        if self.extract is None:
            raise ValueError(
                f"FID needs a classifier, and this judge has none: {self.no_classifier} (nor Inception features: "
                "classifier.inception_weights is not set)"
            )
        if len(images) != self.n:
            raise ValueError(f"FID compares only at equal n: got {len(images)} images, the reference has {self.n}")
        return self._fid(self.extract(images))

    def measure(self, images) -> dict:
        """Every quality metric of one sample set (uint8 (n, H, W), (n, C, H, W) or (n, H, W, 3)) with its interval
        and its replicates; without a classifier, FID and KID on Inception's features or none, and memorisation
        (what was not measured is None)."""
        if len(images) != self.n:
            raise ValueError(f"FID compares only at equal n: got {len(images)} images, the reference has {self.n}")
        point: dict[str, float | None] = {}
        reps: dict[str, list[float]] = {}
        if self.extract is not None:
            f = self.extract(images)
            point["fid"], reps["fid"] = self._fid(f), []
        if self.classifier is not None:
            probs = predict_proba(self.classifier, images)
            point |= {"recognised": recognised_share(probs)} | class_coverage(probs, self.classifier.num_classes)
            reps |= {"recognised": [], "coverage_kl": []}
        near = nearest_distances(images, self.train_images) < self.memorisation_cut
        point["memorised"], reps["memorised"] = float(near.float().mean()), []
        g = torch.Generator().manual_seed(0)
        for _ in range(self.resamples):
            i = torch.randint(self.n, (self.n,), generator=g)
            if self.extract is not None:
                reps["fid"].append(self._fid(f[i]))
            if self.classifier is not None:
                reps["recognised"].append(recognised_share(probs[i]))
                reps["coverage_kl"].append(class_coverage(probs[i], self.classifier.num_classes)["coverage_kl"])
            reps["memorised"].append(float(near[i].float().mean()))
        replicates = {k: np.array(v) for k, v in reps.items()}
        if self.extract is not None:
            replicates["kid"] = kid_subsets(self.reference_features, f, self.resamples, max(2, self.n // 2))
            point["kid"] = float(replicates["kid"].mean())
        for key, values in replicates.items():
            point[f"{key}_lo"], point[f"{key}_hi"] = _interval(values, point[key], key)
        # Not measured: n/a in the report, null in metrics/compare.json.
        point |= {key: None for key in NEEDS_CLASSIFIER if key not in point}
        return {**point, "replicates": replicates}

    def conditional(self, images, labels, real_images, real_labels, classes: tuple[str, ...] = ()) -> dict:
        """For a class-conditional sample set: the share that the classifier reads as the class asked for (with its
        bootstrap interval), and per class asked for, keyed by its name in `classes` (its index where not given),
        that share and the FID against as many real images of that class (a small-n FID: compare classes and
        scales, not papers)."""
        classifier = self._classifier("conditional accuracy")
        labels, real_labels = np.asarray(labels), np.asarray(real_labels)
        hit = (predict_proba(classifier, images).argmax(-1).numpy() == labels).astype(float)
        g = np.random.default_rng(0)
        reps = np.array([hit[g.integers(0, len(hit), len(hit))].mean() for _ in range(self.resamples)])
        per_class, accuracy = {}, {}
        for c in sorted(set(labels.tolist())):
            name = classes[c] if classes else str(c)
            accuracy[name] = float(hit[labels == c].mean())
            mine = images[labels == c]
            real = real_images[real_labels == c][: len(mine)]
            if len(mine) >= 2 and len(real) == len(mine):
                ours, theirs = features(classifier, mine), features(classifier, real)
                per_class[name] = frechet_distance(*gaussian(ours), *gaussian(theirs))
        lo, hi = _interval(reps, float(hit.mean()), "cond_accuracy")
        return {
            "cond_accuracy": float(hit.mean()),
            "cond_accuracy_lo": lo,
            "cond_accuracy_hi": hi,
            "fid_per_class": per_class,
            "fid_class_mean": float(np.mean(list(per_class.values()))) if per_class else None,
            "cond_accuracy_per_class": accuracy,
            "replicates": {"cond_accuracy": reps},
        }


def read_config(path: str | Path, data_root: str | Path) -> dict:
    """models/classifier/config.json as train-classifier wrote it, checked against the dataset at `data_root`: the
    same data (digest), shape and classes. Raises JudgeError naming the first difference."""
    path = Path(path)
    if not path.is_file():
        raise JudgeError(
            f"{path}: missing (it says what the classifier was built for); run `dvc repro train-classifier`"
        )
    config = json.loads(path.read_text())
    info = describe(data_root)
    here = {
        "dataset_digest": dataset_digest(data_root),
        "channels": info.channels,
        "resolution": info.resolution,
        "num_classes": info.num_classes,
    }
    for key, value in here.items():
        if config.get(key) != value:
            raise JudgeError(
                f"{path}: written for {key} {config.get(key)!r}, but {data_root} has {key} {value!r}: the classifier "
                "was trained on other data; run `dvc repro train-classifier`"
            )
    return config


def verdict(a: dict, b: dict, key: str) -> str:
    """'better', 'worse' or 'within noise': is a's `key` better than b's beyond the 95% interval of the difference
    of their (independent) replicates?"""
    diff = np.asarray(a["replicates"][key]) - np.asarray(b["replicates"][key])
    lo, hi = _interval(diff, a[key] - b[key])
    if lo <= 0 <= hi:
        return "within noise"
    a_lower = hi < 0
    return "better" if a_lower == lower_is_better(key) else "worse"


# Two-sided 95% quantiles of Student's t by degrees of freedom: seed-level intervals rest on a few runs.
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def seed_interval(a, b, paired: bool = False) -> tuple[float, float]:
    """95% interval of mean(a) - mean(b), where a and b hold one value per training seed (each value carries its
    sampling noise too). Welch's t for independent runs; paired (the same seeds, e.g. two samplers of one model):
    the t interval of the per-seed differences."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"a seed-level interval needs 2 or more seeds on each side; got {len(a)} and {len(b)}")
    if paired:
        d = a - b
        se, df = d.std(ddof=1) / math.sqrt(len(d)), len(d) - 1
    else:
        va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
        se = math.sqrt(va + vb)
        df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1)) if va + vb > 0 else 1
    df = max(1, int(df))
    t = _T975.get(df, 1.96 + 2.4 / df)  # the table, then a close approximation
    mean = float(a.mean() - b.mean())
    return mean - t * se, mean + t * se


def seed_verdict(a, b, key: str, paired: bool = False) -> str:
    """'better', 'worse' or 'within noise' for the per-seed values a against b (see seed_interval)."""
    lo, hi = seed_interval(a, b, paired)
    if lo <= 0 <= hi:
        return "within noise"
    return "better" if (hi < 0) == lower_is_better(key) else "worse"


def interval_verdict(a: float, a_ci: tuple[float, float], b: float, b_ci: tuple[float, float], key: str) -> str:
    """The verdict for two single measurements known only by their 95% intervals (independent, near normal): the
    difference's half-width is the root of the sum of the squared half-widths."""
    half = math.hypot((a_ci[1] - a_ci[0]) / 2, (b_ci[1] - b_ci[0]) / 2)
    if abs(a - b) <= half:
        return "within noise"
    return "better" if (a < b) == lower_is_better(key) else "worse"
