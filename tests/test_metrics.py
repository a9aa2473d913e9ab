"""The quality metrics on fixtures whose answer is known, with a classifier trained here on real MNIST."""

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from scratch_diffusion.compare_report import columns, settings_metrics
from scratch_diffusion.data import load_split
from scratch_diffusion.metrics import (
    BY_KEY,
    METRICS,
    Judge,
    _interval,
    accuracy,
    class_coverage,
    features,
    kid_subsets,
    memorisation_threshold,
    memorised_share,
    predict_proba,
    recognised_share,
    verdict,
)
from scratch_diffusion.models.classifier import Classifier, FeatureExtractor
from scratch_diffusion.objectives import classifier_loss
from scratch_diffusion.training import fit

N = 400
# MNIST's training-split statistics as the stage computes them (channel_stats; pinned in tests/test_judge.py).
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)


@pytest.fixture(scope="module")
def mnist(mnist_raw):
    root = mnist_raw.parents[1]
    train_x, train_y = load_split(root, train=True, n=6000)
    test_x, test_y = load_split(root, train=False)
    return train_x, train_y, test_x, test_y


@pytest.fixture(scope="module")
def classifier(mnist):
    train_x, train_y, test_x, test_y = mnist
    torch.manual_seed(0)
    net = Classifier(1, 28, 10, MNIST_MEAN, MNIST_STD)
    fit(
        net,
        classifier_loss,
        train_x,
        Accelerator(cpu=True),
        labels=train_y,
        batch_size=64,
        lr=2e-3,
        epochs=2,  # one epoch leaves the confident share near the bound below on some CPUs
        seed=0,
        lr_schedule="cosine",
    )
    net.eval()
    assert accuracy(net, test_x[:2000], test_y[:2000]) > 0.9  # one short epoch; the stage trains to 99%+
    return net


@pytest.fixture(scope="module")
def judge(mnist, classifier):
    train_x, _, test_x, _ = mnist
    return Judge(classifier, test_x, train_x, N, resamples=100)


def test_fid_real_vs_real_is_near_zero_and_noise_is_far(mnist, judge):
    _, _, test_x, _ = mnist
    assert judge.fid(test_x[:N]) == pytest.approx(0.0, abs=1e-3)  # identical sets
    assert judge.floor == pytest.approx(judge.fid(test_x[N : 2 * N]))
    noise = (torch.rand(N, 1, 28, 28) * 255).to(torch.uint8)
    assert judge.fid(noise) > 20 * judge.floor
    # A shifted set (every digit moved 4 pixels right) sits clearly above the floor, below noise.
    shifted = torch.roll(test_x[N : 2 * N], shifts=4, dims=-1)
    assert judge.floor * 1.5 < judge.fid(shifted) < judge.fid(noise)
    with pytest.raises(ValueError, match="equal n"):
        judge.fid(test_x[: N - 1])


def test_fid_and_kid_are_torchmetrics_own(mnist, classifier, judge):
    """The same numbers as torchmetrics' FrechetInceptionDistance and KernelInceptionDistance on the same features
    (KID with one subset of all n, where its random subsets cannot differ)."""
    _, _, test_x, _ = mnist
    fake = torch.roll(test_x[N : 2 * N], shifts=2, dims=-1)
    fid = FrechetInceptionDistance(feature=FeatureExtractor(classifier), normalize=True).set_dtype(torch.float64)
    kid = KernelInceptionDistance(feature=FeatureExtractor(classifier), subsets=1, subset_size=N, normalize=True)
    kid.set_dtype(torch.float64)
    for metric in (fid, kid):
        metric.update(test_x[:N].float() / 255, real=True)
        metric.update(fake.float() / 255, real=False)
    assert judge.fid(fake) == pytest.approx(float(fid.compute()), rel=1e-9)
    ours = kid_subsets(features(classifier, test_x[:N]), features(classifier, fake), subsets=1, size=N)
    assert float(kid.compute()[0]) == pytest.approx(float(ours[0]), rel=1e-9)


def test_measure_gives_intervals_around_the_point_and_is_repeatable(mnist, judge):
    _, _, test_x, _ = mnist
    shifted = torch.roll(test_x[N : 2 * N], shifts=3, dims=-1)
    m = judge.measure(shifted)
    for key in ("fid", "kid", "recognised", "coverage_kl", "memorised"):
        assert m[f"{key}_lo"] <= m[key] <= m[f"{key}_hi"], key
        assert len(m["replicates"][key]) == 100
    assert m["fid_hi"] > m["fid_lo"] and m["kid_hi"] > m["kid_lo"]
    for metric in METRICS:
        if f"{metric.key}_lo" in m:
            lo, hi = metric.bounds
            assert lo <= m[f"{metric.key}_lo"] and m[f"{metric.key}_hi"] <= hi, metric.key
    again = judge.measure(shifted)
    assert again["fid_lo"] == m["fid_lo"] and again["kid"] == m["kid"]


def test_every_metric_the_judge_measures_is_declared_and_reaches_the_report_and_the_json(mnist, judge):
    """What the judge measures reaches compare's table and metrics/compare.json through its declaration in
    metrics.METRICS alone: a metric added to the judge without one fails here."""
    _, _, test_x, test_y = mnist
    images, labels = test_x[N : 2 * N], test_y[N : 2 * N].numpy()
    measured = judge.measure(images) | judge.conditional(images, labels, test_x[2 * N :], test_y[2 * N :])
    del measured["replicates"]
    intervals = {f"{key}_{side}" for key in BY_KEY for side in ("lo", "hi")}
    assert not set(measured) - set(BY_KEY) - intervals, "measured by the judge, not declared in metrics.METRICS"
    row = {"setting": "unet2d/ddim-10-g3", **measured}  # as the compare stage builds it
    shown = {key for key, _, _ in columns([row])}
    saved = settings_metrics([row])["unet2d/ddim-10-g3"]
    assert measured["fid_class_mean"] is not None  # every digit has real images to compare with: all keys present
    for key in measured:
        if key in BY_KEY:
            metric = BY_KEY[key]
            assert (key in shown) == (metric.title is not None), key
            assert (key in saved) == metric.to_json, key
        else:  # an interval: beside its value in the table; in the JSON where declared so
            metric = BY_KEY[key.rsplit("_", 1)[0]]
            assert metric.key in shown and (key in saved) == (metric.to_json and metric.json_interval), key
    assert {"coverage_entropy", "fid_per_class"} <= set(measured) - set(saved)  # declared to_json=False


def test_verdict_separates_real_differences_from_noise(mnist, judge):
    _, _, test_x, _ = mnist
    real_a = judge.measure(test_x[N : 2 * N])
    real_b = judge.measure(test_x[2 * N : 3 * N])
    shifted = judge.measure(torch.roll(test_x[2 * N : 3 * N], shifts=4, dims=-1))
    for key in ("fid", "kid", "recognised"):
        assert verdict(real_a, real_b, key) == "within noise", key  # two real sets: no winner
    assert verdict(real_a, shifted, "fid") == "better" and verdict(shifted, real_a, "fid") == "worse"
    assert verdict(real_a, shifted, "kid") == "better"
    assert verdict(real_a, shifted, "recognised") in ("better", "within noise")
    assert np.all(np.isfinite(shifted["replicates"]["fid"]))


def test_conditional_accuracy_has_an_interval(mnist, judge):
    _, _, test_x, test_y = mnist
    images, labels = test_x[N : 2 * N], test_y[N : 2 * N].numpy()
    right = judge.conditional(images, labels, test_x[2 * N :], test_y[2 * N :])
    wrong = judge.conditional(images, (labels + 1) % 10, test_x[2 * N :], test_y[2 * N :])
    assert right["cond_accuracy"] > 0.9 > 0.1 > wrong["cond_accuracy"]
    assert right["cond_accuracy_lo"] <= right["cond_accuracy"] <= right["cond_accuracy_hi"]
    assert verdict(right, wrong, "cond_accuracy") == "better"
    assert set(right["fid_per_class"]) == {str(c) for c in set(labels.tolist())}


def test_recognised_and_coverage(mnist, classifier):
    _, _, test_x, test_y = mnist
    probs = predict_proba(classifier, test_x[:N])
    assert recognised_share(probs) > 0.8
    real = class_coverage(probs, 10)
    assert real["coverage_kl"] < 0.05
    ones = test_x[test_y == 1][:1].repeat(N, 1, 1, 1)  # one digit, repeated: mode collapse
    collapsed = class_coverage(predict_proba(classifier, ones), 10)
    assert collapsed["coverage_kl"] == pytest.approx(2.302585, abs=1e-5) and collapsed["coverage_entropy"] == 0
    blank = torch.zeros(N, 1, 28, 28, dtype=torch.uint8)
    assert recognised_share(predict_proba(classifier, blank)) < 1.0


def test_memorisation_flags_copies_of_training_images(mnist):
    train_x, _, test_x, _ = mnist
    cut = memorisation_threshold(test_x[:N], train_x)
    assert memorised_share(test_x[N : 2 * N], train_x, cut) < 0.05
    assert memorised_share(train_x[:N], train_x, cut) == 1.0
    half = torch.cat([train_x[: N // 2], test_x[N : N + N // 2]])
    assert memorised_share(half, train_x, cut) == pytest.approx(0.5, abs=0.03)


def test_a_share_near_zero_keeps_its_interval_in_range():
    """Shifting the replicates onto the point can push a rare share's lower bound below 0: it is clipped."""
    replicates = np.array([0.0] * 150 + [0.004] * 50)  # a share of about 0.001, resampled
    assert _interval(replicates, 0.0005, "memorised")[0] == 0.0
    assert _interval(replicates, 0.0005)[0] < 0  # unclipped without a metric's bounds (a difference, KID)


def test_seed_verdicts_need_the_difference_beyond_the_seed_spread():
    from scratch_diffusion.metrics import seed_interval, seed_verdict

    assert seed_verdict([60.0, 62.0, 61.0], [80.0, 79.0, 82.0], "fid") == "better"
    assert seed_verdict([0.80, 0.81, 0.82], [0.90, 0.91, 0.89], "recognised") == "worse"
    assert seed_verdict([60.0, 75.0, 55.0], [64.0, 70.0, 68.0], "fid") == "within noise"  # spread > gap
    # Paired: a constant per-seed gain is certain even when the seeds spread widely.
    assert seed_verdict([50.0, 70.0, 90.0], [52.0, 72.1, 91.9], "fid", paired=True) == "better"
    assert seed_verdict([50.0, 70.0, 90.0], [52.0, 72.1, 91.9], "fid") == "within noise"
    lo, hi = seed_interval([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert lo < 0 < hi and lo == pytest.approx(-hi)
    with pytest.raises(ValueError, match="2 or more seeds"):
        seed_interval([1.0], [2.0, 3.0])


def test_interval_verdict_for_single_measurements():
    from scratch_diffusion.metrics import interval_verdict

    assert interval_verdict(60.0, (55.0, 65.0), 80.0, (75.0, 85.0), "fid") == "better"
    assert interval_verdict(60.0, (50.0, 70.0), 70.0, (60.0, 80.0), "fid") == "within noise"  # 10 < 14.1
    assert interval_verdict(0.7, (0.68, 0.72), 0.9, (0.88, 0.92), "recognised") == "worse"
