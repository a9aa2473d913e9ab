"""A team MLflow server: PostgreSQL as the backend store and the server proxying the artifact store, both on
127.0.0.1. A real training stage logs to it over HTTP; the run, its images and the registered model are read back
through the server alone."""

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, run, run_in_process
from tests.test_mlflow_ui import free_port, mlflow_server

pytestmark = pytest.mark.slow

PG_BIN = next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)), None)
try:
    import psycopg  # noqa: F401  (the PostgreSQL driver SQLAlchemy uses for postgresql://)
except ImportError:  # pragma: no cover - the dev extra installs it
    psycopg = None
SKIP = (
    "no PostgreSQL server binaries (Debian: apt-get install postgresql; .ci/run does)"
    if PG_BIN is None
    else "psycopg is not installed (pip install -e '.[dev]')"
    if psycopg is None
    else None
)


def as_postgres(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: drop to the `postgres` user that Debian's package creates."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@pytest.fixture
def postgres():
    if SKIP:
        pytest.skip(SKIP)
    data = Path(tempfile.mkdtemp(prefix="sd-pg-"))  # outside pytest's root-only tmp: the server user must reach it
    if os.geteuid() == 0:
        shutil.chown(data, "postgres", "postgres")
    port = free_port()
    subprocess.run(
        as_postgres([f"{PG_BIN}/initdb", "-D", str(data / "db"), "-U", "mlflow", "--auth=trust"]),
        check=True,
        capture_output=True,
    )
    server = subprocess.Popen(
        as_postgres(
            [f"{PG_BIN}/postgres", "-D", str(data / "db"), "-h", "127.0.0.1", "-p", str(port), "-k", str(data)]
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while (
            subprocess.run([f"{PG_BIN}/pg_isready", "-h", "127.0.0.1", "-p", str(port)], capture_output=True).returncode
            != 0
        ):
            assert server.poll() is None, server.stdout.read()
            assert time.monotonic() < deadline, "PostgreSQL did not start within 60 s"
            time.sleep(0.3)
        subprocess.run(
            [f"{PG_BIN}/createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "mlflow", "mlflow"],
            check=True,
            capture_output=True,
        )
        yield f"postgresql://mlflow@127.0.0.1:{port}/mlflow"
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture
def tracking_server(postgres, tmp_path):
    artifacts = ("--artifacts-destination", str(tmp_path / "artifact-store"), "--serve-artifacts")
    with mlflow_server(postgres, *artifacts, timeout=120) as url:
        yield url


def test_training_logs_to_the_team_server(project, tracking_server, tmp_path):
    import mlflow
    from mlflow import MlflowClient

    assert run_in_process([sys.executable, str(REPO / "stages/download.py")], cwd=project).returncode == 0
    run(
        [sys.executable, str(REPO / "stages/train_unet2d.py")],
        cwd=project,
        env={"MLFLOW_TRACKING_URI": tracking_server},
    )
    assert not (project / "mlflow.db").exists() and not (project / "mlartifacts").exists()  # all went to the server

    client = MlflowClient(tracking_uri=tracking_server, registry_uri=tracking_server)
    experiment = client.get_experiment_by_name("scratch-diffusion")
    (r,) = client.search_runs([experiment.experiment_id], "attributes.run_name = 'train-unet2d'")
    assert r.info.status == "FINISHED" and r.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied
    assert [m.step for m in client.get_metric_history(r.info.run_id, "loss")] == [2, 4, 6, 8]

    images = [f.path for f in client.list_artifacts(r.info.run_id, "images") if f.path.endswith(".png")]
    assert images
    local = client.download_artifacts(r.info.run_id, images[0], str(tmp_path))
    assert Path(local).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    (version,) = client.search_model_versions("name = 'scratch-diffusion-unet2d'")
    assert version.run_id == r.info.run_id
    mlflow.set_tracking_uri(tracking_server)
    try:
        model = mlflow.pyfunc.load_model(f"models:/scratch-diffusion-unet2d/{version.version}")
        images = model.predict({"n": 2, "steps": 2})
    finally:
        mlflow.set_tracking_uri(None)
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    assert images.shape == (2, 28, 28) and images.dtype == np.uint8
