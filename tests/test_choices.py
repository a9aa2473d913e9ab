"""Each set of allowed names in choices.py is what its implementation accepts: no name config.py lets through
fails later inside the library, and no name the library implements is unreachable from params.yaml."""

import ast
import runpy

import pytest
import torch
import torchvision
from accelerate.utils import PrecisionType
from diffusers.models.unets import unet_2d_blocks
from diffusers.optimization import get_scheduler

from scratch_diffusion import choices, samplers
from scratch_diffusion.config import Params
from scratch_diffusion.corruption import ddpm_scheduler
from scratch_diffusion.hardware import choose, detect, for_sampling
from scratch_diffusion.models.unet2d import UNet2DDenoiser, build_unet
from scratch_diffusion.objectives import ddpm_loss, flow_times, target
from scratch_diffusion.training import lr_factor
from tests.conftest import REPO


def test_the_vocabulary_imports_nothing():
    """config.py imports it in every stage: an import here would widen every stage's DVC deps."""
    tree = ast.parse((REPO / "src/scratch_diffusion/choices.py").read_text())
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)]


def test_config_validates_against_the_vocabulary():
    def choices_of(group) -> dict:
        return {f.name: f.metadata.get("choices") for f in group.__dataclass_fields__.values()}

    unet2d, top = choices_of(Params().unet2d), choices_of(Params())
    assert set(unet2d["corruption"]) == set(choices.CORRUPTIONS)
    assert set(unet2d["conditioning"]) == set(choices.CONDITIONINGS)
    assert set(unet2d["beta_schedule"]) == set(choices.BETA_SCHEDULES)
    assert set(unet2d["loss_weighting"]) == set(choices.LOSS_WEIGHTINGS)
    assert set(unet2d["lr_schedule"]) == set(choices.LR_SCHEDULES)
    assert set(unet2d["mixed_precision"]) == set(choices.TRAIN_PRECISIONS)
    assert set(unet2d["time_sampling"]) == set(choices.TIME_SAMPLINGS)
    assert set(top["objective"]) == set(choices.OBJECTIVES) == {*choices.PREDICTION_TYPES, "flow"}


def test_every_dataset_is_a_torchvision_dataset():
    for folder in choices.DATASETS.values():
        assert hasattr(torchvision.datasets, folder)


def test_every_diffusers_sampler_is_implemented():
    assert set(samplers.SCHEDULERS) == set(choices.DIFFUSERS_SAMPLERS)
    config = ddpm_scheduler().config
    for name in choices.DIFFUSERS_SAMPLERS:
        samplers.make_scheduler(name, config).set_timesteps(10)
    with pytest.raises(ValueError, match="unknown sampler"):
        samplers.make_scheduler("bogus", config)


@pytest.mark.parametrize("beta_schedule", choices.BETA_SCHEDULES)
def test_every_beta_schedule_builds_a_ddpm_scheduler(beta_schedule):
    alpha_bar = ddpm_scheduler(beta_schedule=beta_schedule).alphas_cumprod
    assert torch.all(alpha_bar[1:] < alpha_bar[:-1]) and 0 < alpha_bar[-1] < alpha_bar[0] < 1


@pytest.mark.parametrize("objective", choices.PREDICTION_TYPES)
def test_every_objective_has_a_target_and_a_diffusers_prediction_type(objective):
    x0, eps, alpha_bar = torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2), torch.full((1, 1, 1, 1), 0.5)
    assert target(objective, x0, eps, alpha_bar).shape == x0.shape
    scheduler = ddpm_scheduler(prediction_type=choices.PREDICTION_TYPES[objective])
    x_t = torch.randn(1, 1, 2, 2)
    scheduler.step(torch.zeros_like(x_t), 10, x_t)  # diffusers raises on a prediction_type it does not know


@pytest.mark.parametrize("time_sampling", choices.TIME_SAMPLINGS)
def test_every_time_sampling_is_implemented(time_sampling):
    t = flow_times(100, time_sampling)
    assert t.shape == (100,) and bool(((t > 0) & (t < 1)).all())


@pytest.mark.parametrize("weighting", choices.LOSS_WEIGHTINGS)
def test_every_loss_weighting_is_implemented(weighting):
    assert callable(ddpm_loss(ddpm_scheduler(), "eps", weighting))


def test_every_unet_block_and_conditioning_is_implemented():
    for name in choices.UNET_BLOCKS:
        assert hasattr(unet_2d_blocks, name)
    unet = build_unet((32,), 1, ("DownBlock2D",), ("UpBlock2D",), sample_size=28, channels=1)
    for conditioning in choices.CONDITIONINGS:
        UNet2DDenoiser(unet, conditioning)
    with pytest.raises(ValueError, match="unknown conditioning"):
        UNet2DDenoiser(unet, "bogus")


@pytest.mark.parametrize("warmup", [0, 1, 7])
def test_every_lr_schedule_is_diffusers_own_at_every_step(warmup):
    """training.lr_factor computes the schedule that choices.LR_SCHEDULES names in diffusers' get_scheduler."""
    params = [torch.nn.Parameter(torch.zeros(1))]
    for ours, theirs in choices.LR_SCHEDULES.items():
        factor = lr_factor(ours, warmup, 50)
        reference = get_scheduler(
            theirs, torch.optim.SGD(params, lr=1.0), num_warmup_steps=warmup, num_training_steps=50
        )
        assert [factor(k) for k in range(60)] == [reference.lr_lambdas[0](k) for k in range(60)], ours
    with pytest.raises(ValueError, match="unknown lr schedule 'linear'; allowed: constant, cosine"):
        lr_factor("linear", 0, 10)


def test_every_precision_is_implemented():
    assert set(choices.MIXED_PRECISIONS.values()) <= set(PrecisionType.list())
    for precision in choices.TRAIN_PRECISIONS:
        assert choose("unet2d", precision, False, detect("cpu")).precision in choices.MIXED_PRECISIONS
    for precision in choices.SAMPLE_PRECISIONS:
        for layout in ("auto", True, False):
            for_sampling(precision, layout, "cpu")
    assert set(samplers.PRECISIONS) == set(choices.SAMPLE_PRECISIONS) - {"auto"}


def test_every_sample_model_has_a_folder():
    stage = runpy.run_path(str(REPO / "stages/sample.py"))  # run_name is not __main__: defines, runs nothing
    assert set(stage["MODEL_DIRS"]) == set(choices.SAMPLE_MODELS)
