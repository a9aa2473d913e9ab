import pytest
import torch

from scratch_diffusion.choices import PREDICTION_TYPES
from scratch_diffusion.corruption import ddpm_scheduler
from scratch_diffusion.objectives import (
    ddpm_loss,
    min_snr_weight,
    per_image,
    snr,
    target,
    x0_from_prediction,
)


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    sched = ddpm_scheduler()
    x0 = torch.rand(3, 1, 4, 4) * 2 - 1
    eps = torch.randn_like(x0)
    t = torch.tensor([0, 499, 999])
    alpha_bar = per_image(sched.alphas_cumprod[t], x0)
    x_t = sched.add_noise(x0, eps, t)
    return sched, x0, eps, t, alpha_bar, x_t


def test_targets_by_hand(tiny):
    sched, x0, eps, t, alpha_bar, _ = tiny
    torch.testing.assert_close(target("x0", x0, eps, alpha_bar), x0)
    torch.testing.assert_close(target("eps", x0, eps, alpha_bar), eps)
    ab = float(sched.alphas_cumprod[499])
    by_hand = ab**0.5 * eps[1] - (1 - ab) ** 0.5 * x0[1]
    torch.testing.assert_close(target("v", x0, eps, alpha_bar)[1], by_hand)
    torch.testing.assert_close(target("v", x0, eps, alpha_bar), sched.get_velocity(x0, eps, t))


def test_linear_schedule_pinned_values():
    ab = ddpm_scheduler().alphas_cumprod
    assert float(ab[0]) == pytest.approx(0.9999, abs=1e-6)
    assert float(ab[499]) == pytest.approx(0.0785872, rel=1e-5)  # prod(1 - linspace(1e-4, 0.02))
    assert float(ab[999]) == pytest.approx(4.0358e-05, rel=1e-3)


@pytest.mark.parametrize("objective", list(PREDICTION_TYPES))
def test_exact_prediction_recovers_x0(tiny, objective):
    _, x0, eps, _, alpha_bar, x_t = tiny
    exact = target(objective, x0, eps, alpha_bar)
    torch.testing.assert_close(x0_from_prediction(objective, exact, x_t, alpha_bar), x0, atol=2e-3, rtol=1e-3)


def test_min_snr_weights_by_hand():
    snr_t = torch.tensor([0.5, 5.0, 20.0])
    torch.testing.assert_close(min_snr_weight("x0", snr_t, 5.0), torch.tensor([0.5, 5.0, 5.0]))
    torch.testing.assert_close(min_snr_weight("eps", snr_t, 5.0), torch.tensor([1.0, 1.0, 0.25]))
    torch.testing.assert_close(min_snr_weight("v", snr_t, 5.0), torch.tensor([0.5 / 1.5, 5.0 / 6.0, 5.0 / 21.0]))
    assert float(snr(torch.tensor(0.8))) == pytest.approx(4.0)


def test_unknown_objective_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown objective 'noise'; allowed: x0, eps, v"):
        ddpm_loss(ddpm_scheduler(), "noise")


@pytest.mark.parametrize("objective", list(PREDICTION_TYPES))
@pytest.mark.parametrize("weighting", ["none", "min_snr"])
def test_ddpm_loss_is_zero_for_an_oracle(objective, weighting):
    """A model that returns the exact target has zero loss: the loss wires x_t, t and target consistently."""
    sched = ddpm_scheduler(prediction_type="sample")
    loss_fn = ddpm_loss(sched, objective, weighting)
    x01 = torch.rand(4, 1, 8, 8)
    x0 = x01 * 2 - 1

    def oracle(x_t, t):
        ab = per_image(sched.alphas_cumprod[t], x_t)
        eps = (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()
        return target(objective, x0, eps, ab)

    assert float(loss_fn(oracle, x01)) < 1e-4
