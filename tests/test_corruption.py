import torch

from scratch_diffusion.corruption import corrupt


def test_corrupt_endpoints_and_broadcasting():
    x = torch.rand(4, 1, 28, 28)
    noise = torch.rand_like(x)
    amount = torch.tensor([0.0, 1.0, 0.5, 0.25])
    y = corrupt(x, amount, noise)
    assert y.shape == x.shape
    torch.testing.assert_close(y[0], x[0])  # amount 0: untouched
    torch.testing.assert_close(y[1], noise[1])  # amount 1: pure noise
    torch.testing.assert_close(y[2], 0.5 * x[2] + 0.5 * noise[2])
    torch.testing.assert_close(y[3], 0.75 * x[3] + 0.25 * noise[3])


def test_corrupt_stays_in_unit_range():
    torch.manual_seed(0)
    x = torch.rand(64, 1, 28, 28)
    y = corrupt(x, torch.rand(64))
    assert y.min() >= 0 and y.max() <= 1
