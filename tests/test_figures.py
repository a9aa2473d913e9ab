import math

import numpy as np
import pytest
import torch

from scratch_diffusion.corruption import ddpm_scheduler
from scratch_diffusion.figures import plot_corruption, plot_sampling_steps, plot_schedules, schedule_curves


def test_schedule_curves_against_hand_values():
    curves = schedule_curves(1000, "linear", 1e-4, 0.02)
    assert list(curves) == ["linear (configured)", "scaled_linear", "squaredcos_cap_v2"]
    sqrt_ab, sqrt_1mab, log_snr = curves["linear (configured)"]
    ab = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    for t in (0, 250, 999):
        assert sqrt_ab[t] == pytest.approx(math.sqrt(ab[t]), rel=1e-5)
        assert sqrt_1mab[t] == pytest.approx(math.sqrt(1 - ab[t]), rel=1e-3)  # betas are float32
        assert log_snr[t] == pytest.approx(math.log(ab[t] / (1 - ab[t])), rel=1e-4)
    # Cosine (Nichol & Dhariwal 2021): alpha_bar(t) = f(t)/f(0), f(t) = cos((t/T + s)/(1 + s) * pi/2)^2, s = 0.008.
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert curves["squaredcos_cap_v2"][0][500] == pytest.approx(math.sqrt(f(501) / f(0)), rel=1e-3)
    # Every schedule starts near pure signal and ends near pure noise.
    for s_ab, s_1mab, _ in curves.values():
        assert s_ab[0] > 0.99 and s_1mab[-1] > 0.99


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 16, 16)])  # MNIST's digits, an RGB folder's pictures
def test_figures_are_written(tmp_path, shape):
    plot_schedules(schedule_curves(1000, "squaredcos_cap_v2", 1e-4, 0.02), tmp_path / "s.png")
    plot_corruption(torch.rand(4, *shape), ddpm_scheduler(), tmp_path / "c.png")
    plot_sampling_steps([torch.rand(3, *shape)] * 2, [torch.rand(3, *shape)] * 2, tmp_path / "p.png")
    for name in ("s.png", "c.png", "p.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_a_figure_row_refuses_other_channel_counts(tmp_path):
    with pytest.raises(ValueError, match=r"allowed: \(B, 1, H, W\) or \(B, 3, H, W\)"):
        plot_sampling_steps([torch.rand(3, 2, 8, 8)], [torch.rand(3, 2, 8, 8)], tmp_path / "p.png")
