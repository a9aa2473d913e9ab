"""check-params' proof that params can run (preflight.py): real diffusers constructors and schedulers, no mocks."""

import dataclasses
import re

import pytest

from scratch_diffusion.choices import BETA_SCHEDULES, DIFFUSERS_SAMPLERS, PREDICTION_TYPES
from scratch_diffusion.config import (
    Params,
    ParamsError,
    SampleParams,
    SampleSetting,
    Unet2dParams,
    max_sample_steps,
    params_from_dict,
)
from scratch_diffusion.corruption import ddpm_scheduler
from scratch_diffusion.preflight import (
    DataFacts,
    check_networks,
    check_noise_schedule,
    check_runnable,
    check_samplers,
    schedule_fault,
)


def test_the_defaults_and_the_lesson_architectures_run():
    check_runnable(Params())
    check_runnable(params_from_dict({"unet2d": {"class_conditional": True}}))
    check_runnable(
        params_from_dict(
            {
                "unet2d": {
                    "block_out_channels": [32],
                    "down_block_types": ["AttnDownBlock2D"],
                    "up_block_types": ["AttnUpBlock2D"],
                    "corruption": "toy",
                    "conditioning": "amount",
                },
                "sample": {"settings": [{"model": "unet2d", "sampler": "toy", "steps": 5}]},
            }
        )
    )


@pytest.mark.parametrize("objective", PREDICTION_TYPES)
@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
def test_every_sampler_runs_for_every_objective_and_schedule_up_to_its_limit(objective, beta_schedule):
    """No false refusals: each sampler at 1 step and at the most steps config.py allows, on a short schedule."""
    t = 50
    settings = [
        {"model": "unet2d", "sampler": s, "steps": n}
        for s in DIFFUSERS_SAMPLERS
        for n in sorted({1, max_sample_steps(s, t)})
    ]
    params = params_from_dict(
        {
            "objective": objective,
            "unet2d": {"beta_schedule": beta_schedule, "num_train_timesteps": t, "sample_steps": t},
            "sample": {"settings": settings},
        }
    )
    check_runnable(params)


def test_the_sampler_probe_reports_what_diffusers_raises_past_configs_rule():
    """Built past config.py's rule: DPM-Solver++ at every timestep, with the trained config as read from disk, runs
    past its last sigma; the probe reports diffusers' error as one line."""
    params = Params(sample=SampleParams(settings=(SampleSetting("unet2d", "dpmsolver++", 1000),)))
    with pytest.raises(ParamsError) as err:
        check_runnable(params)
    assert str(err.value).startswith(
        "sample.settings[0]: diffusers cannot run unet2d/dpmsolver++-1000 on this schedule (IndexError: "
    )


@pytest.mark.parametrize("sampler", DIFFUSERS_SAMPLERS)
def test_a_degenerate_schedule_draws_non_finite_images_with_every_sampler(sampler):
    """Why check-params refuses beta_end near 1: alpha_bar reaches 0, and every sampler's images are NaN (black
    once cast to uint8). The probe sees it even on a schedule built past the schedule check."""
    degenerate = ddpm_scheduler(1000, "linear", 1e-4, 0.999, "epsilon")
    params = Params(objective="eps", sample=SampleParams(settings=(SampleSetting("unet2d", sampler, 50),)))
    with pytest.raises(ParamsError, match=rf"unet2d/{re.escape(sampler)}-50 draws non-finite images on this schedule"):
        check_samplers(params, degenerate)


def test_the_network_check_reports_what_the_diffusers_constructor_raises():
    """Built past config.py's choices: diffusers' own error, as one line naming the architecture keys."""
    unet2d = Unet2dParams(up_block_types=("AttnUpBlock2D", "AttnDownBlock2D", "UpBlock2D"))
    with pytest.raises(ParamsError) as err:
        params = dataclasses.replace(Params(), unet2d=unet2d)
        check_networks(params, DataFacts.named(params))
    message = str(err.value)
    assert message.startswith("unet2d: diffusers' UNet2DModel cannot be built and called with block_out_channels=")
    assert "(ValueError: AttnDownBlock2D does not exist.)" in message and "\n" not in message


def test_the_training_grids_ddim_is_probed_too():
    toy_only = SampleParams(settings=(SampleSetting("basic", "toy", 5),))
    params = Params(unet2d=Unet2dParams(num_train_timesteps=10, sample_steps=11), sample=toy_only)  # past config's rule
    with pytest.raises(ParamsError, match="unet2d.sample_steps: diffusers cannot run unet2d/ddim-11"):
        check_samplers(params, check_noise_schedule(params))


@pytest.mark.parametrize(
    "args, fault",
    [
        ((1000, "squaredcos_cap_v2", 1e-4, 0.02), None),
        ((1000, "linear", 1e-4, 0.02), None),
        ((1000, "scaled_linear", 1e-4, 0.02), None),
        ((2, "squaredcos_cap_v2", 1e-4, 0.02), None),
        ((10000, "squaredcos_cap_v2", 1e-4, 0.02), None),
        ((1000, "linear", 1e-4, 0.5), ("alpha_bar reaches 0 at t = 609 (x_t holds no image from there on)", 609)),
        ((1000, "linear", 1e-9, 0.02), ("alpha_bar is 1 at t = 0 (1 - beta_start rounds to 1 in float32)", 0)),
        ((10000, "linear", 1e-4, 0.02), ("alpha_bar stops falling at t = 9917, at 6.03e-44 (float32 underflow)", 9917)),
    ],
)
def test_schedule_faults_pinned(args, fault):
    assert schedule_fault(*args) == fault
