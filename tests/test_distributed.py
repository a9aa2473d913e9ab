"""Several processes: `dvc repro` with `launch: torchrun --nproc_per_node 2` trains both models as two CPU processes
(gloo), on tiny data; the result must look like one run to DVC and MLflow, and like the single-process run."""

import json
import re
import sys

import pytest
import yaml
from mlflow import MlflowClient

from scratch_diffusion.config import params_from_dict
from scratch_diffusion.recipe import train_model
from tests.conftest import run, write_params

pytestmark = pytest.mark.slow

STAGES = {"train-basic": ("train_basic", [2, 4, 6]), "train-unet2d": ("train_unet2d", [2, 4, 6, 8])}


def test_two_processes_act_as_one_run(project, tmp_path):
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    env = {"MLFLOW_TRACKING_URI": uri}
    # Global batch = 2 processes x per-process batch: the TINY params' 32 and 16.
    write_params(
        project, {"launch": "torchrun --nproc_per_node 2", "basic": {"batch_size": 16}, "unet2d": {"batch_size": 8}}
    )
    proc = run(["dvc", "repro", "train-basic", "train-unet2d"], cwd=project, env=env)
    out = proc.stdout + proc.stderr
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("scratch-diffusion")
    two = {}
    for stage, (metrics_name, logged_steps) in STAGES.items():
        # Two processes really ran, and their replicas (weights and EMA) ended bit-identical.
        ends = dict(
            re.findall(
                rf"{stage}: process (\d) of 2 ends with (weights sha256 \w+, EMA sha256 \w+|"
                r"weights sha256 \w+)",
                out,
            )
        )
        assert set(ends) == {"0", "1"}, out[-3000:]
        assert ends["0"] == ends["1"]
        # One MLflow run per stage, each loss step logged once, by the main process only.
        runs = client.search_runs([experiment.experiment_id], f"attributes.run_name = '{stage}'")
        assert len(runs) == 1
        history = client.get_metric_history(runs[0].info.run_id, "loss")
        assert [m.step for m in history] == logged_steps
        two[stage] = json.loads((project / f"metrics/{metrics_name}.json").read_text())
        assert two[stage]["steps"] == logged_steps[-1]
    versions = client.search_model_versions("name = 'scratch-diffusion-unet2d'")
    assert len(versions) == 1  # outputs (and the registered model) written once

    # The same global batch in one process (the stages' training, in this one): a comparable loss (not equal: each
    # shard draws its own noise).
    write_params(project, {"launch": "python", "basic": {"batch_size": 32}, "unet2d": {"batch_size": 16}})
    params = params_from_dict(yaml.safe_load((project / "params.yaml").read_text()))
    for stage in STAGES:
        network = stage.removeprefix("train-")
        one = train_model(network, params, data_root=project / "data/dataset").result
        assert one.final_loss == pytest.approx(two[stage]["final_loss"], rel=0.3), stage


def test_bad_launcher_is_refused(project):
    write_params(project, {"launch": "accelerate --num_processes 2"})
    proc = run([sys.executable, "stages/train_basic.py"], cwd=project, check=False)
    assert proc.returncode != 0
    assert "launch: got 'accelerate --num_processes 2', allowed: a command starting with" in proc.stderr
