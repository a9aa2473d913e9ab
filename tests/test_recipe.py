"""One owner of a training run: every script that trains reaches training through recipe.train_model."""

import ast
import dataclasses
import sys

import pytest
import torch
from accelerate.state import AcceleratorState

from scratch_diffusion.config import load_params
from scratch_diffusion.data import describe
from scratch_diffusion.model_files import load_unet2d
from scratch_diffusion.recipe import dataset_meta, train_model, unet2d_meta, used_params
from tests.conftest import REPO, run_in_process

TRAINERS = [
    "stages/train_basic.py",
    "stages/train_unet2d.py",
    "stages/train_classifier.py",
    "ablations/sweep.py",
    "ablations/ema_horizons.py",
    "benchmarks/speed.py",
]
# What only the one entry may touch: building the parts, the loop, checkpoints and the stage's accelerator.
INSIDE = {"fit", "stage_accelerator", "make_accelerator", "Checkpointing", "resumable_run_id", "_parts", "save_file"}


@pytest.mark.parametrize("path", TRAINERS)
def test_every_trainer_calls_the_one_entry_and_none_of_its_steps(path):
    tree = ast.parse((REPO / path).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    called = {
        n.func.id if isinstance(n.func, ast.Name) else getattr(n.func, "attr", "")
        for n in ast.walk(tree)
        if isinstance(n, ast.Call)
    }
    assert "train_model" in called, f"{path} does not train through recipe.train_model"
    assert not (imported | called) & INSIDE, f"{path} retraces the entry: {sorted((imported | called) & INSIDE)}"


def test_no_module_but_the_owner_reaches_the_training_loop():
    """fit, the stage's accelerator and the EMA are recipe.train_model's (training.py holds them): no other module of
    the library, no stage, no benchmark and no ablation script imports or calls them."""
    owner = {"src/scratch_diffusion/recipe.py", "src/scratch_diffusion/training.py"}
    loop = {"fit", "make_accelerator", "stage_accelerator", "EMA", "Checkpointing"}
    for path in sorted(p for d in ("src", "stages", "benchmarks", "ablations") for p in (REPO / d).rglob("*.py")):
        name = str(path.relative_to(REPO))
        if name in owner:
            continue
        tree = ast.parse(path.read_text())
        imported = {
            a.name
            for n in ast.walk(tree)
            if isinstance(n, ast.ImportFrom) and (n.module or "").endswith("training")
            for a in n.names
        }
        called = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
        assert not (imported | called) & loop, f"{name} reaches the training loop: {sorted((imported | called) & loop)}"


def test_an_unknown_network_is_refused():
    with pytest.raises(ValueError, match="unknown network 'judge'; allowed: basic, unet2d, classifier"):
        used_params("judge", load_params(REPO / "params.yaml"))


@pytest.fixture
def downloaded(project):
    assert run_in_process([sys.executable, str(REPO / "stages/download.py")], cwd=project).returncode == 0
    return project


def test_without_a_stage_it_trains_and_saves_the_stages_model_folder(downloaded, tmp_path, monkeypatch):
    """The ablation scripts' use: no MLflow run, no checkpoints, no reports; the folder is the stage's format."""
    monkeypatch.chdir(downloaded)
    params = load_params()
    params = dataclasses.replace(params, unet2d=dataclasses.replace(params.unet2d, max_steps=2, mixed_precision="fp32"))
    AcceleratorState._reset_state(reset_partial_state=True)  # one precision per process: earlier tests chose theirs
    seen = []
    trained = train_model(
        "unet2d",
        params,
        out=tmp_path / "unet2d",
        on_sample=lambda step, net: seen.append(step),
        sample_every=1,
        desc="test",
    )
    assert trained.result.steps == 2 and trained.run_id is None and seen == [0, 1]
    assert not (downloaded / "mlflow.db").exists() and not (downloaded / "checkpoints").exists()
    model, _, meta = load_unet2d(tmp_path / "unet2d")
    assert meta == {**unet2d_meta(params), **dataset_meta(describe("data/dataset")), "run_id": ""}
    assert (meta["dataset"], meta["resolution"], meta["channels"]) == ("mnist", 28, 1) and len(meta["classes"]) == 10
    assert model.image_shape == (1, 28, 28)
    saved, held = model.state_dict(), trained.model.state_dict()
    assert all(torch.equal(saved[k], held[k].cpu()) for k in saved)


def test_ema_horizons_of_one_run_are_the_averages_of_runs_with_each_warmup(downloaded, tmp_path, monkeypatch):
    """The EMA never feeds back into training: the average at each warm-up kept beside the others is, bit for bit,
    the average a run with that warm-up keeps (what ablations/ema_horizons.py rests on)."""
    monkeypatch.chdir(downloaded)
    params = load_params()
    params = dataclasses.replace(params, unet2d=dataclasses.replace(params.unet2d, max_steps=3, mixed_precision="fp32"))
    AcceleratorState._reset_state(reset_partial_state=True)
    both = train_model("unet2d", params, ema_warmups=(10, 4), desc="test")
    assert sorted(both.averages) == [4, 10] and both.model is both.averages[10]
    alone = train_model("unet2d", dataclasses.replace(params, unet2d=dataclasses.replace(params.unet2d, ema_warmup=4)))
    held, kept = alone.model.state_dict(), both.averages[4].state_dict()
    assert all(torch.equal(held[k], kept[k]) for k in held)
    with pytest.raises(ValueError, match="ema_warmups: the UNet2DModel's, without a stage"):
        train_model("unet2d", params, stage="train-unet2d", out=tmp_path / "m", ema_warmups=(4,))
