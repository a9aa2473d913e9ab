"""End to end: the real `dvc repro` and `dvc exp run` on a git+DVC copy of the project with tiny params."""

import json

import pytest
from mlflow import MlflowClient

from tests.conftest import run

pytestmark = pytest.mark.slow

OUTPUTS = [
    "data/dataset/manifest.json",
    "models/basic/model.safetensors",
    "models/basic/run.json",
    "metrics/train_basic.json",
    "plots/train_basic/loss.tsv",
    "plots/train_basic/samples.png",
    "models/unet2d/model_index.json",
    "models/unet2d/unet/diffusion_pytorch_model.safetensors",
    "metrics/train_unet2d.json",
    "plots/train_unet2d/samples.png",
]


def test_dvc_repro_then_experiments(project):
    out = run(["dvc", "repro"], cwd=project).stdout
    for stage in ["download", "train-basic", "train-unet2d"]:
        assert f"Running stage '{stage}'" in out
    for path in OUTPUTS:
        assert (project / path).is_file(), path

    # Default store: SQLite at the repo root, absolute; the run id in the DVC output points into it.
    run_id = json.loads((project / "models/basic/run.json").read_text())["run_id"]
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    assert client.get_run(run_id).info.status == "FINISHED"

    assert "up to date" in run(["dvc", "status"], cwd=project).stdout.lower()
    assert "Running stage" not in run(["dvc", "repro"], cwd=project).stdout
    assert "final_loss" in run(["dvc", "metrics", "show", "--json"], cwd=project).stdout

    # Changing the objective reruns train-unet2d only: neither download nor train-basic.
    run(["git", "add", "-A"], cwd=project)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "baseline"], cwd=project)
    exp = run(["dvc", "exp", "run", "-S", "objective=eps", "-n", "eps-exp"], cwd=project).stdout
    assert "Running stage 'train-unet2d'" in exp
    assert "Running stage 'download'" not in exp and "Running stage 'train-basic'" not in exp
    shown = json.loads(run(["dvc", "exp", "show", "--json"], cwd=project).stdout)
    names = [e.get("name") for rev in shown for e in (rev.get("experiments") or []) for e in e["revs"]]
    assert "eps-exp" in names

    # The experiment's run landed in the same store, tagged with its DVC experiment name.
    runs = client.search_runs(
        [client.get_experiment_by_name("scratch-diffusion").experiment_id],
        filter_string="tags.dvc_exp_name = 'eps-exp'",
    )
    assert [r.data.params["objective"] for r in runs] == ["eps"]
