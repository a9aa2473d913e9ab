import copy

import pytest
import torch

from scratch_diffusion.choices import PREDICTION_TYPES
from scratch_diffusion.corruption import ddpm_scheduler
from scratch_diffusion.models import UNet2DDenoiser, build_unet
from scratch_diffusion.objectives import per_image, target
from scratch_diffusion.samplers import SCHEDULERS, generate, make_scheduler, sample_images, toy_sample


def test_toy_sampler_ends_at_an_oracle_prediction():
    """A denoiser that always predicts the same x0 makes the lesson's sampler land exactly on it."""
    target_x0 = torch.rand(3, 1, 28, 28)
    out = toy_sample(lambda x_t, t: target_x0, torch.rand(3, 1, 28, 28), steps=5)
    torch.testing.assert_close(out, target_x0)


def test_toy_sampler_records_each_step():
    calls = []

    def model(x_t, t):
        calls.append(t.clone())
        return torch.zeros_like(x_t)

    out, inputs, preds = toy_sample(model, torch.ones(2, 1, 28, 28), steps=4, record=True)
    assert len(inputs) == len(preds) == 4
    # Each step moves 1/(n-i) of the way to the prediction (zeros): 1 -> 3/4 -> 2/4 -> 1/4 -> 0.
    assert [float(i[0, 0, 0, 0]) for i in inputs] == [1.0, 0.75, 0.5, 0.25]
    assert float(out.abs().max()) == 0.0
    assert [round(float(t[0]), 2) for t in calls] == [1.0, 0.75, 0.5, 0.25]


def _oracle(objective, x0, alphas_cumprod):
    """Returns the exact target for a known x0, given x_t and t (the DDPM-form input every sampler must feed)."""

    def model(x_t, t):
        ab = per_image(alphas_cumprod[t.round().long().cpu()].float(), x_t)
        eps = (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()
        return target(objective, x0, eps, ab)

    return model


@pytest.mark.parametrize("objective", list(PREDICTION_TYPES))
@pytest.mark.parametrize("sampler", list(SCHEDULERS))
def test_every_sampler_ends_at_x0_with_an_oracle(objective, sampler):
    """Catches wrong input scaling (Euler/Heun), wrong alphas (spacing) and wrong data ranges."""
    torch.manual_seed(0)
    sched = ddpm_scheduler(prediction_type=PREDICTION_TYPES[objective])
    x0 = torch.rand(2, 1, 8, 8) * 1.6 - 0.8  # inside [-1, 1], away from the clip edges
    x01, _ = sample_images(
        _oracle(objective, x0, sched.alphas_cumprod), sampler, 10, torch.randn(2, 1, 8, 8), sched.config, seed=0
    )
    torch.testing.assert_close(x01, (x0 + 1) / 2, atol=2e-3, rtol=0)


@pytest.fixture(scope="module")
def tiny_unet():
    torch.manual_seed(0)
    unet = build_unet(
        (32, 32), 1, ("DownBlock2D", "AttnDownBlock2D"), ("AttnUpBlock2D", "UpBlock2D"), sample_size=28, channels=1
    )
    return UNet2DDenoiser(unet).eval(), ddpm_scheduler(prediction_type="epsilon")


@pytest.mark.parametrize(
    ("sampler", "steps", "nfe"),
    [("ddpm", 3, 3), ("ddim", 3, 3), ("dpmsolver++", 3, 3), ("euler", 3, 3), ("heun", 3, 5), ("unipc", 3, 3)],
)
def test_tiny_model_shape_range_determinism_nfe(tiny_unet, sampler, steps, nfe):
    model, sched = tiny_unet
    kwargs = dict(batch_size=2, seed=7, corruption="ddpm", trained_config=sched.config)
    images, counted = generate(model, sampler, steps, 3, **kwargs)
    assert images.shape == (3, 28, 28) and images.dtype.name == "uint8"
    assert counted == nfe  # Heun evaluates twice per step but the first
    again, _ = generate(model, sampler, steps, 3, **kwargs)
    assert (images == again).all()
    other, _ = generate(model, sampler, steps, 3, **{**kwargs, "seed": 8})
    assert not (images == other).all()


def test_multistep_scheduler_is_fresh_per_batch(tiny_unet):
    """DPM-Solver++ keeps state between steps: several batches must not index past the end."""
    model, sched = tiny_unet
    images, _ = generate(
        model, "dpmsolver++", 4, 6, batch_size=2, seed=0, corruption="ddpm", trained_config=sched.config
    )
    assert images.shape == (6, 28, 28)


def test_the_nhwc_layout_draws_the_same_images(tiny_unet):
    """channels_last changes how the model's tensors sit in memory, not what it computes: the images agree with
    NCHW's up to float rounding (a pixel level at most)."""
    model, sched = tiny_unet
    kwargs = dict(batch_size=3, seed=7, corruption="ddpm", trained_config=sched.config)
    nchw, _ = generate(copy.deepcopy(model), "ddim", 3, 3, **kwargs)
    converted = copy.deepcopy(model)
    nhwc, _ = generate(converted, "ddim", 3, 3, channels_last=True, **kwargs)
    conv = converted.unet.conv_out.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert abs(nchw.astype(int) - nhwc.astype(int)).max() <= 1


def test_unknown_sampler():
    with pytest.raises(ValueError, match="unknown sampler 'plms'; allowed: ddpm, ddim"):
        make_scheduler("plms", ddpm_scheduler().config)
