"""train-unet2d for a few steps on real MNIST images, for each objective, into a real MLflow store."""

import json
import re
import sys
from dataclasses import replace
from importlib import metadata
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, UNet2DModel
from mlflow import MlflowClient

from scratch_diffusion.config import load_params
from scratch_diffusion.hardware import choose, detect
from scratch_diffusion.model_files import load_unet2d
from scratch_diffusion.recipe import train_model
from scratch_diffusion.samplers import generate
from tests.conftest import REPO, run, run_in_process, write_params


def assert_plain_ddim_draws_what_we_draw(folder):
    """An oracle from outside the project: diffusers' own DDIMPipeline on the folder's unet and scheduler config
    draws, for the same start noise, the images the project's DDIM sampler draws from the loaded model."""
    model, scheduler, _ = load_unet2d(folder)
    ours, _ = generate(model, "ddim", 4, 3, batch_size=3, seed=5, corruption="ddpm", trained_config=scheduler.config)
    ddim = DDIMScheduler.from_pretrained(folder / "scheduler", timestep_spacing="trailing")
    theirs = DDIMPipeline(unet=UNet2DModel.from_pretrained(folder / "unet"), scheduler=ddim)(
        batch_size=3,
        num_inference_steps=4,
        eta=0.0,
        use_clipped_model_output=True,
        output_type="np",
        generator=torch.Generator().manual_seed(5),
    ).images[..., 0]
    assert np.abs((theirs * 255).round() - ours.astype(float)).max() <= 1


@pytest.fixture
def downloaded(project):
    assert run_in_process([sys.executable, str(REPO / "stages/download.py")], cwd=project).returncode == 0
    return project


def trains_logs_and_registers(project, uri: str, objective: str) -> None:
    """train-unet2d for 12 steps with `objective`: what it prints, saves, logs and registers."""
    write_params(project, {"objective": objective, "unet2d": {"max_steps": 12, "lr": 2e-3}})
    proc = run([sys.executable, str(REPO / "stages/train_unet2d.py")], cwd=project, env={"MLFLOW_TRACKING_URI": uri})

    # What it runs with, chosen from this machine's hardware (params say auto), said first, then how long it takes.
    choice = replace(choose("unet2d", "auto", "auto", detect("cpu")), why="12 steps are too few to pay for timing")
    lines = proc.stdout.splitlines()
    assert lines[0] == choice.line("train-unet2d", torch.get_num_threads()), proc.stdout
    assert re.search(
        r"^train-unet2d: \d+ img/s over steps 2-6; about \d+ s left for the 6 steps to go$", proc.stdout, re.M
    ), proc.stdout
    cost = json.loads((project / "metrics/cost/train-unet2d.json").read_text())
    assert {k: cost[k] for k in choice.as_params(prefix="")} == choice.as_params(prefix="")
    assert cost["chosen_by"] == "rule" and cost["timings"] == ""

    metrics = json.loads((project / "metrics/train_unet2d.json").read_text())
    curve = [float(r.split("\t")[1]) for r in (project / "plots/train_unet2d/loss.tsv").read_text().split("\n")[1:-1]]
    assert metrics["steps"] == 12 and len(curve) == 6
    assert curve[-1] < curve[0], f"{objective}: loss did not go down: {curve}"

    # diffusers format with the right prediction_type, and our metadata beside it.
    sched_cfg = json.loads((project / "models/unet2d/scheduler/scheduler_config.json").read_text())
    assert sched_cfg["prediction_type"] == {"x0": "sample", "eps": "epsilon", "v": "v_prediction"}[objective]
    _, _, meta = load_unet2d(project / "models/unet2d")
    assert meta["objective"] == objective and meta["conditioning"] == "timestep"

    info = json.loads((project / "models/unet2d/run.json").read_text())
    client = MlflowClient(tracking_uri=uri)
    r = client.get_run(info["run_id"])
    assert r.info.status == "FINISHED" and r.data.params["objective"] == objective
    assert r.data.params["unet2d.mixed_precision"] == "auto"
    assert r.data.params["resolved.precision"] == choice.precision
    assert r.data.params["resolved.channels_last"] == "False"
    assert [m.step for m in client.get_metric_history(r.info.run_id, "loss")] == [2, 4, 6, 8, 10, 12]
    images = [f.path for f in client.list_artifacts(r.info.run_id, "images")]
    assert any("samples+step+4+" in p for p in images) and any("samples+step+12+" in p for p in images)
    version = client.get_model_version(info["registered_model"], info["registered_version"])
    assert version.tags["objective"] == objective and version.tags["unet2d.batch_size"] == "16"


@pytest.mark.parametrize("objective", ["eps", "v"])
def test_each_objective_trains_logs_and_registers(downloaded, tmp_path, objective):
    trains_logs_and_registers(downloaded, f"sqlite:///{tmp_path / 'store.db'}", objective)


def test_the_default_objective_trains_and_its_model_loads_in_ddpm_pipeline_and_generates(downloaded, tmp_path):
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'store.db'}"}
    trains_logs_and_registers(downloaded, env["MLFLOW_TRACKING_URI"], "x0")
    card = (downloaded / "models/unet2d/README.md").read_text()  # the model card: what it draws and how
    assert "DDPMPipeline.from_pretrained" in card and "`mnist` images, 28 x 28, one channel (grey)" in card
    pipe = DDPMPipeline.from_pretrained(downloaded / "models/unet2d")
    out = pipe(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")
    assert out.images.shape == (2, 28, 28, 1)
    assert out.images.min() >= 0 and out.images.max() <= 1

    assert_plain_ddim_draws_what_we_draw(downloaded / "models/unet2d")

    # The generate command, from the DVC output and from the model registry: the same EMA weights, same images (in
    # this process: the console script itself is run by tests/test_pipeline.py).
    cli = [sys.executable, "-m", "scratch_diffusion", "generate", "--sampler", "ddim", "--steps", "3", "--n", "4"]
    for model, out in (("models/unet2d", "from_dvc"), ("models:/scratch-diffusion-unet2d/1", "from_registry")):
        done = run_in_process([*cli, "--model", model, "--out", out], cwd=downloaded, env=env)
        assert done.returncode == 0, done.stderr
    a = np.load(downloaded / "from_dvc/ddim-3-seed0.npz")["images"]
    b = np.load(downloaded / "from_registry/ddim-3-seed0.npz")["images"]
    assert a.shape == (4, 28, 28) and (downloaded / "from_dvc/ddim-3-seed0.png").is_file()
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1

    # The logged model's requirements name every package its code imports, at the versions that wrote it.
    info = json.loads((downloaded / "models/unet2d/run.json").read_text())
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    requirements = Path(mlflow.pyfunc.get_model_dependencies(info["model_uri"])).read_text().split()
    for package in ("torch", "diffusers", "numpy", "safetensors"):
        assert f"{package}=={metadata.version(package)}" in requirements, requirements

    bad = run_in_process([*cli, "--model", "models:/no-such-model/1"], cwd=downloaded, env=env)
    assert bad.returncode == 2 and "--model: cannot load 'models:/no-such-model/1'" in bad.stderr
    bad = run_in_process([*cli[:-4], "--sampler", "toy", "--model", "models/unet2d"], cwd=downloaded, env=env)
    assert bad.returncode == 2 and "--sampler: got 'toy'" in bad.stderr
    bad = run_in_process([*cli, "--model", "models/unet2d", "--digit", "7"], cwd=downloaded, env=env)
    assert bad.returncode == 2 and "is not class-conditional" in bad.stderr


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            {"objective": "eps", "unet2d": {"corruption": "toy", "conditioning": "amount"}},
            "objective: got 'eps' with unet2d.corruption=toy",
        ),
        ({"unet2d": {"corruption": "toy"}}, "unet2d.conditioning: got 'timestep' with unet2d.corruption=toy"),
        ({"unet2d": {"conditioning": "amount"}}, "unet2d.conditioning: got 'amount' with unet2d.corruption=ddpm"),
        ({"unet2d": {"down_block_types": ["DownBlock2D"]}}, "unet2d.down_block_types: got 1 blocks"),
        ({"unet2d": {"up_block_types": ["UpBlock2D", "MidBlock"]}}, "unet2d.up_block_types[1]: got 'MidBlock'"),
        ({"unet2d": {"beta_schedule": "cosine"}}, "allowed: 'linear', 'scaled_linear', 'squaredcos_cap_v2'"),
        ({"objective": "noise"}, "objective: got 'noise', allowed: 'x0', 'eps', 'v', 'flow'"),
    ],
)
def test_invalid_settings_fail_before_work(project, overrides, message):
    write_params(project, overrides)
    proc = run_in_process([sys.executable, str(REPO / "stages/train_unet2d.py")], cwd=project)
    assert proc.returncode == 2 and message in proc.stderr and proc.stderr.count("\n") == 1
    assert not (project / "models").exists()


def trained_in_process(project, overrides: dict, monkeypatch) -> Path:
    """What train-unet2d trains and saves (recipe.train_model, the stage's one entry), in this process: for the claims
    about the model folder, which the stage writes through the same call."""
    write_params(project, overrides)
    monkeypatch.chdir(project)
    train_model("unet2d", load_params(), out="models/unet2d", desc="test")
    return project / "models/unet2d"


def test_toy_corruption_with_amount_conditioning_trains(downloaded, monkeypatch):
    overrides = {"unet2d": {"corruption": "toy", "conditioning": "amount", "max_steps": 4}}
    trained_in_process(downloaded, overrides, monkeypatch)
    _, _, meta = load_unet2d(downloaded / "models/unet2d")
    assert meta["corruption"] == "toy" and meta["conditioning"] == "amount"
    # Plain diffusers would draw DDPM samples from a toy-corruption net: the folder is no DDPMPipeline, and its
    # model card says how to sample it.
    with pytest.raises(Exception, match="model_index.json"):
        DDPMPipeline.from_pretrained(downloaded / "models/unet2d")
    card = (downloaded / "models/unet2d/README.md").read_text()
    assert "--sampler toy" in card and "refuses it" in card


def test_a_timestep_blind_model_draws_the_same_in_plain_diffusers(downloaded, monkeypatch):
    """`conditioning: none` trains on t = 0 only; the saved UNet ignores t, so diffusers' own DDIMPipeline, which
    feeds the real t, draws what the project's sampler draws with t = 0."""
    folder = trained_in_process(downloaded, {"unet2d": {"conditioning": "none", "max_steps": 4}}, monkeypatch)
    model, _, meta = load_unet2d(folder)
    assert meta["conditioning"] == "none" and "ignores t" in (folder / "README.md").read_text()
    assert_plain_ddim_draws_what_we_draw(folder)
    # ... and the saved UNet really is blind to t: two timesteps, one output.
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        at_zero, elsewhere = model.unet(x, torch.tensor([0, 0])).sample, model.unet(x, torch.tensor([3, 900])).sample
    torch.testing.assert_close(at_zero, elsewhere)
