"""A shared DVC remote: repo A trains and pushes to a directory remote; a fresh clone B pulls, with nothing to redo."""

import re
import subprocess

import pytest

from tests.conftest import run

pytestmark = pytest.mark.slow

GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]


def test_push_then_pull_into_a_fresh_clone(project, tmp_path):
    remote = tmp_path / "remote"
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'store.db'}"}
    run(["dvc", "remote", "add", "--default", "shared", str(remote)], cwd=project)
    run(["dvc", "repro", "train-basic"], cwd=project, env=env)
    subprocess.run(["git", "add", "-A"], cwd=project, check=True)
    subprocess.run([*GIT, "commit", "-qm", "train-basic"], cwd=project, check=True)
    run(["dvc", "push"], cwd=project)
    assert any(remote.rglob("*")), "nothing reached the remote"

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(project), str(clone)], check=True)
    assert not (clone / "models/basic/model.safetensors").exists()
    run(["dvc", "pull", "--with-deps", "train-basic"], cwd=clone)  # what that stage and its upstream made
    assert (clone / "models/basic/model.safetensors").read_bytes() == (
        project / "models/basic/model.safetensors"
    ).read_bytes()
    assert (clone / "data/dataset/manifest.json").exists()

    status = run(["dvc", "status", "train-basic"], cwd=clone)
    assert "Data and pipelines are up to date." in status.stdout, status.stdout
    # And so B does not retrain: repro runs at most check-params (always changed: it lists the data source), which
    # finds the source as it was, and nothing else: no MLflow run is made (check-params makes no store either).
    store = tmp_path / "b.db"
    repro = run(["dvc", "repro", "train-basic"], cwd=clone, env={"MLFLOW_TRACKING_URI": f"sqlite:///{store}"})
    assert set(re.findall(r"Running stage '([\w-]+)'", repro.stdout)) <= {"check-params"}, repro.stdout
    assert "Stage 'train-basic' didn't change, skipping" in repro.stdout, repro.stdout
    assert not store.exists()
