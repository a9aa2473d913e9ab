"""End to end: the real `dvc repro` on a git+DVC copy of the project with tiny params."""

import json

import pytest
from mlflow import MlflowClient

from tests.conftest import run

pytestmark = pytest.mark.slow


def test_dvc_repro_then_nothing_to_do(project):
    out = run(["dvc", "repro"], cwd=project).stdout
    assert "Running stage 'download'" in out and "Running stage 'train-basic'" in out
    for path in [
        "data/dataset/manifest.json",
        "models/basic/model.safetensors",
        "models/basic/run.json",
        "metrics/train_basic.json",
        "plots/train_basic/loss.tsv",
        "plots/train_basic/samples.png",
    ]:
        assert (project / path).is_file(), path

    # Default store: SQLite at the repo root, absolute; the run id in the DVC output points into it.
    run_id = json.loads((project / "models/basic/run.json").read_text())["run_id"]
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    assert client.get_run(run_id).info.status == "FINISHED"

    assert "up to date" in run(["dvc", "status"], cwd=project).stdout.lower()
    again = run(["dvc", "repro"], cwd=project).stdout
    assert "Running stage" not in again

    shown = run(["dvc", "metrics", "show", "--json"], cwd=project).stdout
    assert "final_loss" in shown
