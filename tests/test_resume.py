"""Kill a real training process mid-run, rerun it, and get the uninterrupted run's weights to the bit."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

from tests.conftest import REPO, make_project, run, run_in_process, write_params

FAST = {
    "data": {"n_train": 256},
    "basic": {
        "batch_size": 32,
        "epochs": 6,
        "max_steps": 40,
        "log_every": 2,
        "sample_every": 0,
        "checkpoint_every": 5,
        "checkpoints_keep": 3,
    },
    "mlflow": {"log_model": False},
}
STAGE = [sys.executable, str(REPO / "stages/train_basic.py")]


@pytest.fixture
def downloaded(project):
    write_params(project, FAST)
    assert run_in_process([sys.executable, str(REPO / "stages/download.py")], cwd=project).returncode == 0
    return project


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, mnist_raw):
    """The weights and loss curve of the FAST training run straight through: what every interrupted run must end
    with, to the bit."""
    project = make_project(tmp_path_factory.mktemp("uninterrupted") / "project", mnist_raw)
    write_params(project, FAST)
    assert run_in_process([sys.executable, str(REPO / "stages/download.py")], cwd=project).returncode == 0
    run(STAGE, cwd=project, env={"MLFLOW_TRACKING_URI": f"sqlite:///{project.parent / 'ref.db'}"})
    return _weights(project), (project / "plots/train_basic/loss.tsv").read_text(), _metrics(project)


def _metrics(project):
    return json.loads((project / "metrics/train_basic.json").read_text())


def _env(store):
    return {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{store}",
        "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}",
    }


def _kill_after_checkpoint(project, store, step: int) -> None:
    proc = subprocess.Popen(STAGE, cwd=project, env=_env(store), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list((project / "checkpoints/train-basic").glob(f"*/step-{step:07d}/complete.json")):
        assert proc.poll() is None, "training ended before it could be killed"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (project / "models/basic/model.safetensors").exists()


def _weights(project):
    return load_file(project / "models/basic/model.safetensors")


def test_kill_and_resume_gives_identical_weights_and_one_run(downloaded, tmp_path, uninterrupted):
    project = downloaded
    store = tmp_path / "store.db"
    _kill_after_checkpoint(project, store, step=10)
    # Everything in a checkpoint loads weights-only: safetensors, JSON, and Accelerate's weights_only loads.
    (folder,) = (project / "checkpoints/train-basic").glob("*/step-0000010")
    saved = {p.name for p in folder.iterdir()}
    assert {"model.safetensors", "train_state.json", "complete.json"} <= saved
    assert not any(name.startswith("custom_checkpoint") for name in saved)
    out = run(STAGE, cwd=project, env={"MLFLOW_TRACKING_URI": f"sqlite:///{store}"}).stdout
    assert "resumed from" in out

    (ref, curve, _), got = uninterrupted, _weights(project)
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    assert (project / "plots/train_basic/loss.tsv").read_text() == curve

    # One MLflow run, continued: every loss step logged exactly once.
    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    runs = client.search_runs([client.get_experiment_by_name("scratch-diffusion").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")]
    assert steps == list(range(2, 41, 2))
    assert json.loads((project / "models/basic/run.json").read_text())["run_id"] == runs[0].info.run_id


def test_corrupt_checkpoint_falls_back_to_the_previous_one(downloaded, tmp_path, uninterrupted):
    project = downloaded
    _kill_after_checkpoint(project, tmp_path / "store.db", step=15)
    newest = sorted((project / "checkpoints/train-basic").glob("*/step-*"))[-1]
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    proc = run(STAGE, cwd=project, env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'store.db'}"})
    assert "could not be loaded" in proc.stderr and "resumed from" in proc.stdout
    (ref, _, _), got = uninterrupted, _weights(project)
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def test_a_half_readable_checkpoint_restores_nothing(downloaded, tmp_path, uninterrupted):
    """Weights that load but a train_state.json that does not: a resume restores all or nothing, so with every
    checkpoint damaged this way the run starts over from step 0 as a fresh run would, to the bit: the same params and
    seed give the uninterrupted run's weights, curve and losses in another project (reproducible on CPU)."""
    project = downloaded
    _kill_after_checkpoint(project, tmp_path / "store.db", step=15)
    damaged = sorted((project / "checkpoints/train-basic").glob("*/step-*/train_state.json"))
    assert len(damaged) == 3
    for state in damaged:
        state.write_text("{ not json")
    proc = run(STAGE, cwd=project, env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'store.db'}"})
    assert proc.stderr.count("could not be loaded") == 3 and "training starts from step 0" in proc.stdout
    (ref, curve, metrics), got = uninterrupted, _weights(project)
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    assert (project / "plots/train_basic/loss.tsv").read_text() == curve
    ours = _metrics(project)
    assert ours["epoch_losses"] == metrics["epoch_losses"] and ours["final_loss"] == metrics["final_loss"]


def test_changed_params_do_not_resume(downloaded, tmp_path):
    project = downloaded
    _kill_after_checkpoint(project, tmp_path / "store.db", step=10)
    write_params(project, {"basic": {"lr": 5e-4}})
    out = run(STAGE, cwd=project, env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'store.db'}"}).stdout
    assert (
        "checkpoints of other inputs (basic.lr changed): starting fresh, cleared" in out and "resumed from" not in out
    )
    markers = [json.loads(m.read_text()) for m in (project / "checkpoints/train-basic").glob("*/step-*/complete.json")]
    assert markers != []  # the new run's own
    assert len({json.dumps(m["identity"], sort_keys=True) for m in markers}) == 1


@pytest.mark.slow
def test_a_killed_experiment_rerun_with_the_same_arguments_resumes_its_own_checkpoint(project, uninterrupted):
    """`dvc exp run` puts the workspace's outputs back before it runs; the checkpoints are none of them, so the rerun
    of a killed experiment finds its own progress and ends with the weights of a run never interrupted."""
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}"}
    write_params(project, {**FAST, "basic": {**FAST["basic"], "max_steps": 20}})
    run(["dvc", "repro", "train-basic"], cwd=project)
    run(["git", "add", "-A"], cwd=project)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "baseline"], cwd=project)

    exp = ["dvc", "exp", "run", "train-basic", "-S", f"basic.max_steps={FAST['basic']['max_steps']}"]  # = FAST
    proc = subprocess.Popen(
        exp, cwd=project, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 300
    while not list((project / "checkpoints/train-basic").glob("*/step-0000025/complete.json")):
        assert proc.poll() is None, "the experiment ended before it could be killed"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    out = run(exp, cwd=project).stdout
    assert re.search(r"resumed from \S+/step-00000(25|30|35) \(step (25|30|35)\)", out), out
    weights, _, _ = uninterrupted
    got = _weights(project)
    assert all(torch.equal(weights[k], got[k]) for k in weights)


def test_a_disk_that_fills_while_checkpointing_is_one_line_and_leaves_no_partial_checkpoint(downloaded, tmp_path):
    """A file-size limit (EFBIG, as a full disk gives ENOSPC) that a checkpoint does not fit under: one line, no
    traceback, and no incomplete checkpoint left to take space (a complete one would stay to resume from)."""
    import resource

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process instead of failing the write
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    store = tmp_path / "store.db"
    # The store's schema and the experiment, written before the limit (as a first run would have).
    MlflowClient(f"sqlite:///{store}").create_experiment("scratch-diffusion", (downloaded / "mlruns").as_uri())
    # The BasicUNet's optimizer state (about 2.4 MB) outgrows the limit at the first checkpoint.
    proc = subprocess.run(
        STAGE, cwd=downloaded, env=_env(store), capture_output=True, text=True, preexec_fn=limit_file_size
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "cannot write it, the disk is full" in proc.stderr and "Traceback" not in proc.stderr
    assert re.search(r"checkpoints/train-basic/[0-9a-f]{12}/step-\d{7}", proc.stderr), proc.stderr
    assert not [
        p for p in (downloaded / "checkpoints/train-basic").glob("*/step-*") if not (p / "complete.json").exists()
    ]
