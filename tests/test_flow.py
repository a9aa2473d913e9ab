"""Flow matching (objective `flow`): the training target as defined, the time scale diffusers' flow-matching
schedulers use, every flow sampler driven by the exact velocity of data whose velocity field is known in closed form,
the model folder that plain diffusers samples, and every refusal."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import yaml
from diffusers import DDPMPipeline

from scratch_diffusion.config import ParamsError, params_from_dict
from scratch_diffusion.corruption import ddpm_scheduler, flow_scheduler
from scratch_diffusion.model_files import ModelFileError, load_unet2d
from scratch_diffusion.objectives import flow_loss, flow_path, flow_times
from scratch_diffusion.recipe import train_model, training_identity
from scratch_diffusion.samplers import diffusion_sample, generate, make_scheduler, samplers_for
from scratch_diffusion.serving import Drawable, RequestError, check_request
from tests.conftest import REPO, TINY, merge

T = 1000


class Recorder(torch.nn.Module):
    """Predicts zeros and remembers what it was called with."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x_t, t, y=None):
        self.calls.append((x_t, t, y))
        return torch.zeros_like(x_t)


def test_the_target_is_the_straight_paths_velocity_at_the_schedulers_timestep():
    x01 = torch.rand(8, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    net = Recorder()
    torch.manual_seed(3)
    loss = flow_loss(T)(net, x01)
    torch.manual_seed(3)  # the same draws, in the loss's order: the noise, then the times
    x0 = x01 * 2 - 1
    eps = torch.randn_like(x0)
    t = torch.rand(8)
    ((x_t, timestep, _),) = net.calls
    torch.testing.assert_close(x_t, (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps)
    torch.testing.assert_close(timestep, t * T)
    torch.testing.assert_close(loss, ((eps - x0) ** 2).mean())  # zero prediction: the MSE is the target's power


def test_the_path_is_diffusers_forward_process_at_each_of_its_timesteps():
    scheduler = flow_scheduler(T)
    scheduler.set_timesteps(7)
    x0, noise = torch.randn(1, 1, 4, 4), torch.randn(1, 1, 4, 4)
    for timestep in scheduler.timesteps:
        theirs = scheduler.scale_noise(x0, timestep.view(1), noise)
        torch.testing.assert_close(flow_path(x0, noise, timestep.view(1) / T), theirs)


def test_logit_normal_times_have_the_asked_mean_and_scale():
    torch.manual_seed(0)
    t = flow_times(20000, "logit_normal", logit_mean=0.5, logit_std=0.8)
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean() - 0.5) < 0.03 and abs(logit.std() - 0.8) < 0.03
    assert float(t.min()) > 0 and float(t.max()) < 1
    with pytest.raises(ValueError, match="unknown time sampling 'beta'; allowed: uniform, logit_normal"):
        flow_loss(T, "beta")


class ExactVelocity(torch.nn.Module):
    """The exact velocity E[eps - x0 | x_t] of an equal mixture of N(m_k, s^2 I) on the path x_t = (1 - t) x0 + t eps:
    x_t given component k is N((1 - t) m_k, ((1 - t)^2 s^2 + t^2) I). s = 0 makes the components points."""

    image_shape = (1, 4, 4)

    def __init__(self, means, s: float):
        super().__init__()
        self.means, self.s = means, s

    def forward(self, x_t, timestep, y=None):
        t = (timestep.double() / T).view(-1, 1, 1, 1)
        x, a = x_t.double(), 1 - t
        var = a**2 * self.s**2 + t**2
        log_p = torch.stack([-((x - a * m) ** 2).flatten(1).sum(1) / (2 * var.flatten()) for m in self.means], 1)
        w = log_p.softmax(1)
        v = 0
        for k, m in enumerate(self.means):
            x0 = m + a * self.s**2 / var * (x - a * m)  # E[x0 | x_t, k]
            eps = t / var * (x - a * m)  # E[eps | x_t, k]
            v = v + w[:, k].view(-1, 1, 1, 1) * (eps - x0)
        return v.float()


# (sampler, steps, options, relative std tolerance). The higher-order solvers land within 2% in 10-20 steps; the
# first-order ones (Euler, DDIM) err by about c / steps, so they are held to a few percent at 100.
SAMPLERS = [
    ("heun", 10, {}, 0.02),
    ("dpmsolver++", 20, {}, 0.02),
    ("unipc", 20, {}, 0.02),
    ("euler", 100, {}, 0.03),
    ("euler", 100, {"shift": 3.0}, 0.06),
    ("ddim", 100, {}, 0.03),
    ("ddim", 100, {"eta": 1.0}, 0.06),
]


@pytest.mark.parametrize(("sampler", "steps", "options", "tolerance"), SAMPLERS)
def test_each_flow_sampler_driven_by_the_exact_velocity_lands_on_the_data(sampler, steps, options, tolerance):
    noise = torch.randn(4000, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    config = flow_scheduler(T).config
    eta = options.get("eta", 0.0)
    shift = options.get("shift", 1.0)

    def draw(oracle):
        scheduler = make_scheduler(sampler, config, shift=shift)
        x, nfe = diffusion_sample(oracle, scheduler, steps, noise, torch.Generator().manual_seed(1), eta=eta)
        return x, nfe

    # A Gaussian N(0.2, 0.3^2) per pixel (inside the data range, so DDIM's clip changes nothing).
    x, nfe = draw(ExactVelocity([torch.full((1, 4, 4), 0.2)], 0.3))
    assert nfe == (2 * steps - 1 if sampler == "heun" else steps)
    assert abs(float(x.mean()) - 0.2) < 0.01, float(x.mean())
    assert abs(float(x.std()) - 0.3) < tolerance * 0.3, float(x.std())
    # Two points: every sample lands on one of them, about half on each.
    a = torch.full((1, 4, 4), 0.6)
    x, _ = draw(ExactVelocity([a, -a], 0.0))
    to_a, to_b = ((x - a) ** 2).flatten(1).mean(1), ((x + a) ** 2).flatten(1).mean(1)
    assert float(torch.minimum(to_a, to_b).sqrt().max()) < 0.02
    assert 0.45 < float((to_a < to_b).float().mean()) < 0.55


def test_flow_ddim_with_eta_zero_is_an_euler_step_where_nothing_is_clipped():
    """Without its clip, DDIM on the straight path moves x by (s' - s) v, as FlowMatchEulerDiscreteScheduler does."""
    oracle = ExactVelocity([torch.full((1, 4, 4), 0.1)], 0.2)
    noise = 0.3 * torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(0))  # x0 estimates stay in range
    ours, _ = diffusion_sample(oracle, make_scheduler("ddim", flow_scheduler(T).config), 8, noise)
    theirs, _ = diffusion_sample(oracle, make_scheduler("euler", flow_scheduler(T).config), 8, noise)
    # FlowMatchEulerDiscreteScheduler ends its sigmas at 1/T, then 0; FlowDDIM spaces them down to 0 directly.
    assert float((ours - theirs).abs().max()) < 0.02


@pytest.fixture(scope="module")
def flow_folder(tmp_path_factory, mnist_raw):
    """A flow model trained 4 steps by the training stages' owner, in its model folder."""
    raw = merge(yaml.safe_load((REPO / "params.yaml").read_text()), {"unet2d": TINY["unet2d"]})
    raw = merge(
        raw, {"objective": "flow", "unet2d": {"max_steps": 4, "mixed_precision": "fp32", "channels_last": False}}
    )
    folder = tmp_path_factory.mktemp("flow") / "unet2d"
    train_model("unet2d", params_from_dict(raw), data_root=mnist_raw.parents[1], out=folder, desc="flow")
    return folder


def test_the_model_folder_says_how_to_sample_it_and_plain_diffusers_agrees(flow_folder):
    model, scheduler, meta = load_unet2d(flow_folder)
    assert meta["objective"] == "flow" and type(scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert json.loads((flow_folder / "model_index.json").read_text())["scheduler"][1] == type(scheduler).__name__
    assert "objective `flow` (flow matching" in (flow_folder / "README.md").read_text()
    # DDPMPipeline steps the saved FlowMatchEulerDiscreteScheduler: the images our Euler sampler draws.
    ours, _ = generate(model, "euler", 4, 3, batch_size=3, seed=5, corruption="ddpm", trained_config=scheduler.config)
    pipe = DDPMPipeline.from_pretrained(flow_folder)
    theirs = pipe(batch_size=3, num_inference_steps=4, output_type="np", generator=torch.Generator().manual_seed(5))
    assert np.abs((theirs.images[..., 0] * 255).round() - ours.astype(float)).max() <= 1
    for sampler in samplers_for("ddpm", scheduler.config):
        images, _ = generate(
            model, sampler, 3, 2, batch_size=2, seed=0, corruption="ddpm", trained_config=scheduler.config
        )
        assert images.shape == (2, 28, 28), sampler


def test_a_flow_model_refuses_ddpms_ancestral_sampler_and_a_ddpm_model_a_shift(flow_folder):
    model, scheduler, meta = load_unet2d(flow_folder)
    assert samplers_for("ddpm", scheduler.config) == ("ddim", "dpmsolver++", "euler", "heun", "unipc")
    with pytest.raises(ValueError, match="sampler 'ddpm' is DDPM's ancestral chain"):
        make_scheduler("ddpm", scheduler.config)
    drawable = Drawable(model, "ddpm", scheduler.config, ())
    with pytest.raises(RequestError) as e:
        check_request(drawable, {"sampler": "ddpm", "steps": 10, "n": 1}, {})
    assert "(the model was trained with flow matching)" in str(e.value)
    with pytest.raises(ValueError, match="shift: got 3.0 for a DDPM model; allowed: 1"):
        make_scheduler("euler", ddpm_scheduler().config, shift=3.0)


def test_a_request_moves_a_flow_models_steps_by_its_shift_and_other_models_refuse_one(flow_folder, tmp_path):
    from scratch_diffusion.cli import generate_main
    from scratch_diffusion.serving import draw

    model, scheduler, _ = load_unet2d(flow_folder)
    flow = Drawable(model, "ddpm", scheduler.config, ())
    raw = {"sampler": "euler", "steps": 3, "n": 2}
    shifted = check_request(flow, {**raw, "shift": 3}, {})
    assert shifted.shift == 3.0 and check_request(flow, raw, {}).shift == 1.0
    images, _, _ = draw(flow, shifted, precision="fp32", channels_last=False)
    ours, _ = generate(model, "euler", 3, 2, batch_size=2, seed=0, corruption="ddpm", trained_config=scheduler.config)
    theirs, _ = generate(
        model, "euler", 3, 2, batch_size=2, seed=0, corruption="ddpm", trained_config=scheduler.config, shift=3.0
    )
    assert np.array_equal(images, theirs) and not np.array_equal(images, ours)
    for bad in (0, -1, 101, True, "3"):
        with pytest.raises(RequestError, match=r"^shift: got .*, allowed: a number > 0 and <= 100"):
            check_request(flow, {**raw, "shift": bad}, {})
    ddpm = Drawable(model, "ddpm", ddpm_scheduler().config, ())
    with pytest.raises(
        RequestError, match=r"^shift: got 3, allowed: 1 \(shift moves a flow model's steps; this one was"
    ):
        check_request(ddpm, {**raw, "shift": 3}, {})
    assert check_request(ddpm, {**raw, "shift": 1}, {}).shift == 1.0
    # generate --shift names its files as the sample stage names the setting.
    generate_main(
        [
            "--model",
            str(flow_folder),
            "--sampler",
            "euler",
            "--steps",
            "3",
            "--n",
            "2",
            "--shift",
            "3",
            "--precision",
            "fp32",
            "--channels-last",
            "false",
            "--out",
            str(tmp_path),
        ]
    )
    with np.load(tmp_path / "euler-3-shift3-seed0.npz") as f:
        assert np.array_equal(f["images"], theirs)


def test_a_folder_whose_scheduler_is_not_its_objectives_is_refused(flow_folder, tmp_path):
    import shutil

    for objective, scheduler in (("x0", "flow"), ("flow", "ddpm")):
        folder = tmp_path / objective
        shutil.copytree(flow_folder, folder)
        meta = json.loads((folder / "scratch_diffusion.json").read_text())
        (folder / "scratch_diffusion.json").write_text(json.dumps({**meta, "objective": objective}))
        if scheduler == "ddpm":
            ddpm_scheduler().save_pretrained(folder / "scheduler")
        wanted = "FlowMatchEulerDiscreteScheduler" if objective == "flow" else "DDPMScheduler"
        with pytest.raises(ModelFileError, match=rf"scheduler_config.json: _class_name '\w+', but .* \({wanted}\)"):
            load_unet2d(folder)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"objective": "flow", "unet2d": {"loss_weighting": "min_snr"}},
            "unet2d.loss_weighting: got 'min_snr' with objective=flow; allowed: 'none'",
        ),
        ({"unet2d": {"time_sampling": "logit_normal"}}, "unet2d.time_sampling: got 'logit_normal' with objective=x0"),
        (
            {"objective": "flow", "sample": {"settings": [{"model": "unet2d", "sampler": "ddpm", "steps": 10}]}},
            "sample.settings[0].sampler: got 'ddpm' with objective=flow; allowed: ddim, dpmsolver++, euler, heun",
        ),
        (
            {"objective": "flow", "serve": {"sampler": "ddpm", "eta": 0}},
            "serve.sampler: got 'ddpm' with objective=flow",
        ),
        (
            {"sample": {"settings": [{"model": "unet2d", "sampler": "euler", "steps": 10, "shift": 3}]}},
            "sample.settings[0].shift: got 3.0 with objective=x0; allowed: 1",
        ),
        (
            {"sample": {"settings": [{"model": "unet2d", "sampler": "ddpm", "steps": 10, "shift": 3}]}},
            "sample.settings[0].shift: got 3.0 for sampler 'ddpm'; allowed: 1",
        ),
        ({"objective": "flow", "unet2d": {"corruption": "toy", "conditioning": "amount"}}, "objective: got 'flow'"),
        ({"unet2d": {"logit_std": 0}}, "unet2d.logit_std: got 0.0, allowed range (0.0, 10.0]"),
    ],
)
def test_each_refusal_is_one_line_naming_the_key(overrides, message):
    raw = merge(yaml.safe_load((REPO / "params.yaml").read_text()), overrides)
    with pytest.raises(ParamsError) as e:
        params_from_dict(raw)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_a_flow_runs_identity_holds_no_betas_and_a_ddpm_runs_no_flow_times(mnist_raw):
    """Keys a training never reads are no part of its identity or logged params: changing them resumes the finished
    run (DVC reruns the stage) rather than training the same weights again."""
    root = mnist_raw.parents[1]
    base = yaml.safe_load((REPO / "params.yaml").read_text())

    def identity(objective, unet2d):
        params = params_from_dict(merge(base, {"objective": objective, "unet2d": unet2d}))
        return training_identity("unet2d", params, root)

    flow = identity("flow", {})
    assert not {"unet2d.beta_schedule", "unet2d.beta_end", "unet2d.min_snr_gamma"} & set(flow["params"])
    assert identity("flow", {"beta_end": 0.03, "beta_schedule": "linear"}) == flow
    assert identity("flow", {"logit_std": 2.0}) != flow  # flow's own time sampling is read
    x0 = identity("x0", {})
    assert not {"unet2d.time_sampling", "unet2d.logit_std", "unet2d.label_dropout"} & set(x0["params"])
    assert identity("x0", {"logit_std": 2.0, "min_snr_gamma": 3.0, "label_dropout": 0.2}) == x0
    assert identity("x0", {"beta_end": 0.03}) != x0
    assert identity("x0", {"loss_weighting": "min_snr", "min_snr_gamma": 3.0}) != identity(
        "x0", {"loss_weighting": "min_snr"}
    )


def test_a_shifted_setting_is_named_by_its_shift():
    params = params_from_dict(
        {
            "objective": "flow",
            "sample": {"settings": [{"model": "unet2d", "sampler": "euler", "steps": 20, "shift": 3}]},
        }
    )
    (setting,) = params.sample.settings
    assert (
        setting.name == "unet2d/euler-20-shift3" and dataclasses.replace(setting, shift=1.0).name == "unet2d/euler-20"
    )
    assert math.isclose(setting.shift, 3.0)
