"""The quality metrics on fixtures whose answer is known, with a classifier trained here on real MNIST."""

import pytest
import torch
from accelerate import Accelerator

from scratch_diffusion.data import load_split
from scratch_diffusion.metrics import (
    FID,
    accuracy,
    class_coverage,
    classifier_loss,
    memorisation_threshold,
    memorised_share,
    predict_proba,
    recognised_share,
)
from scratch_diffusion.models.classifier import MnistClassifier
from scratch_diffusion.training import fit

N = 400


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
    net = MnistClassifier()
    fit(net, classifier_loss, train_x, Accelerator(cpu=True), labels=train_y, batch_size=64, lr=2e-3, epochs=1,
        seed=0, lr_schedule="cosine")  # fmt: skip
    net.eval()
    assert accuracy(net, test_x[:2000], test_y[:2000]) > 0.9  # one short epoch; the stage trains to 99%+
    return net


def test_fid_real_vs_real_is_near_zero_and_noise_is_far(mnist, classifier):
    _, _, test_x, _ = mnist
    fid = FID(classifier, test_x[:N])
    floor = fid(test_x[N : 2 * N])
    assert fid(test_x[:N]) == pytest.approx(0.0, abs=1e-3)  # identical sets
    noise = (torch.rand(N, 1, 28, 28) * 255).to(torch.uint8)
    assert fid(noise) > 20 * floor
    # A shifted set (every digit moved 4 pixels right) sits clearly above the floor, below noise.
    shifted = torch.roll(test_x[N : 2 * N], shifts=4, dims=-1)
    assert floor * 1.5 < fid(shifted) < fid(noise)
    with pytest.raises(ValueError, match="equal n"):
        fid(test_x[: N - 1])


def test_recognised_and_coverage(mnist, classifier):
    _, _, test_x, test_y = mnist
    probs = predict_proba(classifier, test_x[:N])
    assert recognised_share(probs) > 0.8
    real = class_coverage(probs)
    assert real["coverage_kl"] < 0.05
    ones = test_x[test_y == 1][:1].repeat(N, 1, 1, 1)  # one digit, repeated: mode collapse
    collapsed = class_coverage(predict_proba(classifier, ones))
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
