"""train-basic on a few hundred real MNIST images for a few steps, logged into a real SQLite MLflow store."""

import json
import sys
from dataclasses import replace

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

from scratch_diffusion import serving
from scratch_diffusion.hardware import choose, detect
from scratch_diffusion.models import BasicUNet
from tests.conftest import REPO, make_project, run, run_in_process, write_params


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mnist_raw):
    """One training, read by the tests below (none of them writes to it)."""
    project = make_project(tmp_path_factory.mktemp("trained") / "project", mnist_raw)
    uri = f"sqlite:///{project.parent / 'store.db'}"
    assert run_in_process([sys.executable, str(REPO / "stages/download.py")], cwd=project).returncode == 0
    # Credentials in the environment must never reach a param or a tag.
    secrets = {
        "AWS_SECRET_ACCESS_KEY": "SECRET-aws-1",
        "MLFLOW_TRACKING_PASSWORD": "SECRET-pw-2",
        "HF_TOKEN": "SECRET-3",
    }
    proc = run(
        [sys.executable, str(REPO / "stages/train_basic.py")], cwd=project, env={"MLFLOW_TRACKING_URI": uri, **secrets}
    )
    return project, uri, proc


def test_outputs_and_metrics(trained):
    project, _, proc = trained
    metrics = json.loads((project / "metrics/train_basic.json").read_text())
    assert metrics["steps"] == 6 and len(metrics["epoch_losses"]) == 1
    assert 0 < metrics["final_loss"] < 0.5 and metrics["images_per_s"] > 0
    rows = (project / "plots/train_basic/loss.tsv").read_text().splitlines()
    assert rows[0] == "step\tloss" and [r.split("\t")[0] for r in rows[1:]] == ["2", "4", "6"]
    assert (project / "plots/train_basic/samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    state = load_file(project / "models/basic/model.safetensors")
    net = BasicUNet(1, 1, 28)
    net.load_state_dict(state)  # strict: every key and shape matches
    # The folder says what the network was trained on, so that sampling draws that shape.
    meta = json.loads((project / "models/basic/scratch_diffusion.json").read_text())
    assert meta == {"dataset": "mnist", "resolution": 28, "channels": 1, "classes": [str(d) for d in range(10)]}
    assert "step 6/6" in proc.stdout  # plain progress lines off a terminal
    # params say auto; 6 steps are too few to time the candidates: the rule decides, and the line says why.
    choice = replace(choose("basic", "auto", "auto", detect("cpu")), why="6 steps are too few to pay for timing")
    assert proc.stdout.splitlines()[0] == choice.line("train-basic", torch.get_num_threads())
    cost = json.loads((project / "metrics/cost/train-basic.json").read_text())
    assert cost["precision"] == choice.precision and cost["channels_last"] is True and cost["wall_s"] > 0


def test_mlflow_run_is_complete(trained):
    project, uri, _ = trained
    info = json.loads((project / "models/basic/run.json").read_text())
    client = MlflowClient(tracking_uri=uri)
    r = client.get_run(info["run_id"])
    assert r.info.status == "FINISHED" and r.info.run_name == "train-basic"
    assert r.data.params["basic.batch_size"] == "32" and r.data.params["data.n_train"] == "256"
    assert r.data.params["seed"] == "42"
    assert len(r.data.tags["params_hash"]) == 12 and r.data.tags["dvc_stage"] == "train-basic"
    logged = " ".join(f"{k}={v}" for k, v in {**r.data.params, **r.data.tags}.items())
    assert "SECRET-" not in logged
    assert [m.step for m in client.get_metric_history(r.info.run_id, "loss")] == [2, 4, 6]
    assert len(client.get_metric_history(r.info.run_id, "epoch_loss")) == 1
    images = [f.path for f in client.list_artifacts(r.info.run_id, "images")]
    logged_steps = {int(p.split("+step+")[1].split("+")[0]) for p in images}
    assert logged_steps == {0, 3, 6}, logged_steps  # before training, every 3 steps, and the final model

    # The logged model draws with the folder's weights what the loader of generate and sample draws from it.
    mlflow.set_tracking_uri(uri)
    assert info["registered_model"] == "scratch-diffusion-basic" and info["registered_version"] == 1
    images = mlflow.pyfunc.load_model(info["model_uri"]).predict({"n": 2, "seed": 1, "steps": 3})
    request = serving.Request(2, 1, "toy", 3, 0.0, None, None)
    assert np.array_equal(images, serving.draw(serving.load(project / "models/basic"), request)[0])


def test_bad_param_is_one_line_and_writes_nothing(project):
    write_params(project, {"basic": {"mixed_precision": "fp8"}})
    proc = run_in_process([sys.executable, str(REPO / "stages/train_basic.py")], cwd=project)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: basic.mixed_precision: got 'fp8', allowed: 'auto', 'fp32', 'bf16', 'fp16'")
    assert not (project / "models").exists() and not (project / "mlflow.db").exists()


def test_missing_dataset_names_the_stage(project):
    proc = run_in_process([sys.executable, str(REPO / "stages/train_basic.py")], cwd=project)
    assert proc.returncode == 2 and "dvc repro download" in proc.stderr
