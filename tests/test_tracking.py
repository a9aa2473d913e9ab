"""The store under concurrency: racing processes (the real DVC queue on a fresh store: test_pipeline.py; the alias
`champion`: test_champion.py)."""

import os
import subprocess
import sys

import mlflow
from mlflow import MlflowClient

from scratch_diffusion import tracking

RACER = """
from scratch_diffusion import tracking
with tracking.start_run("race", "racer", {"a": 1}, {}):
    tracking.log_metrics({"x": 1.0})
"""


def test_processes_racing_on_a_fresh_store_all_log(tmp_path):
    """As `dvc queue start -j 2` on a repository without mlflow.db: every worker's first call creates the schema
    unless the store is opened once under a lock (without it, most of these processes died here)."""
    uri = f"sqlite:///{tmp_path / 'fresh.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    procs = [
        subprocess.Popen([sys.executable, "-c", RACER], env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    errors = [p.communicate()[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], errors
    client = mlflow.MlflowClient(tracking_uri=uri)
    assert len(client.search_runs([client.get_experiment_by_name("race").experiment_id])) == 4


def test_a_moved_or_copied_project_keeps_its_registry_and_logs_where_it_is(tmp_path, monkeypatch, capfd):
    """MLflow records absolute artifact paths: after `mv project elsewhere` every registry version was `No such
    artifact` and the next run logged into the old folder. The project's own store follows the folder, once."""
    import shutil
    from pathlib import Path

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    made = tmp_path / "made here"
    (made / ".dvc").mkdir(parents=True)
    monkeypatch.chdir(made)
    tracking.connect()
    tracking._set_experiment("e", local_store=True)
    (made / "weights.txt").write_text("the trained weights")
    with mlflow.start_run() as run:
        mlflow.log_artifact(str(made / "weights.txt"), "model")
    client = MlflowClient()
    client.create_registered_model("m")
    client.create_model_version("m", f"runs:/{run.info.run_id}/model", run.info.run_id)

    for where, keep in (("moved", False), ("copied", True)):
        here = tmp_path / where
        (shutil.copytree if keep else shutil.move)(made if not keep else tmp_path / "moved", here)
        monkeypatch.chdir(here)
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # as a new process: connect() exported the last one
        capfd.readouterr()
        tracking.connect()
        said = capfd.readouterr().err
        assert f"mlflow.db: the project was made in {made if not keep else tmp_path / 'moved'}" in said, said
        got = mlflow.artifacts.download_artifacts("models:/m/1", dst_path=str(tmp_path / f"{where}-download"))
        assert (Path(got) / "weights.txt").read_text() == "the trained weights"
        tracking._set_experiment("e", local_store=True)
        with mlflow.start_run():
            mlflow.log_artifact(str(here / "weights.txt"), "again")
        logged = {p.relative_to(here).parts[0] for p in here.rglob("again/weights.txt")}
        assert logged == {"mlartifacts"}, logged  # into this folder, not the one it was made in
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        tracking.connect()
        assert "mlflow.db:" not in capfd.readouterr().err  # once


def test_a_continued_run_keeps_its_params_when_auto_was_resolved_another_way(tmp_path, monkeypatch):
    """A training resumed from its checkpoint continues its MLflow run. `auto` timed by the first process is read
    from the cache by the next (resolved.chosen_by 'timed' then 'cached'): MLflow refuses a changed param value, so
    the continued run keeps the values it started with and logs only what it lacks."""
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    try:
        with tracking.start_run("e", "train", {"lr": 0.001, "resolved.chosen_by": "timed"}, {}) as first:
            run_id = first.info.run_id
        params = {"lr": 0.001, "resolved.chosen_by": "cached", "resolved.timings": ""}
        with tracking.start_run("e", "train", params, {}, resume_run_id=run_id) as again:
            assert again.info.run_id == run_id
    finally:
        mlflow.set_tracking_uri(None)
        # start_run selected the experiment of this store for the whole process (a global and an env var).
        mlflow.tracking.fluent._active_experiment_id = None
        os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
    held = MlflowClient(tracking_uri=uri).get_run(run_id)
    assert held.data.params == {"lr": "0.001", "resolved.chosen_by": "timed", "resolved.timings": ""}
    assert held.info.status == "FINISHED"
