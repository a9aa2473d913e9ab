"""No secret in the output: a real `mlflow server --app-name basic-auth` on 127.0.0.1, and real stages and `generate`
that log to it with the password in MLFLOW_TRACKING_URI (http://user:password@host:port). Every byte they print, and
every param, tag and artifact they log, is searched for the password. Wrong or missing credentials are one line that
names the server (without the password) and what to set, exit code 2, before any work. What these processes print is
what `dvc queue logs` and CI logs hold."""

import base64
import json
import os
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest

from scratch_diffusion import tracking
from tests.conftest import REPO, run, run_in_process, run_queue, write_params
from tests.test_mlflow_ui import mlflow_server

try:
    import flask_wtf  # noqa: F401  (the auth app's CSRF protection: mlflow[auth])
except ImportError:  # pragma: no cover - the dev extra installs it
    flask_wtf = None

USER, PASSWORD = "admin", "Pw7f3k9zQx-s3cret"  # the auth app refuses admin passwords under 12 characters
TOKEN = "ghp_T0kenInAGitRemote"
# The password as it could leak: plain, percent-encoded, or inside a Basic Authorization header.
LEAKS = (PASSWORD, urllib.parse.quote(PASSWORD), base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode(), TOKEN)
GENERATE = [sys.executable, "-m", "scratch_diffusion", "generate", "--steps", "2", "--n", "2"]


def leaks(text: str) -> list[str]:
    return [s for s in LEAKS if s in text]


def with_credentials(url: str, user: str = USER, password: str = PASSWORD) -> str:
    return url.replace("http://", f"http://{user}:{password}@", 1)


def printed(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """A tracking server that wants Basic auth for every API call (/health stays public), artifacts proxied through it;
    its artifact folder `broken` is a file, so an experiment stored there fails every upload."""
    if flask_wtf is None:
        pytest.skip("Flask-WTF is not installed (the basic-auth app needs it: pip install -e '.[dev]')")
    root = tmp_path_factory.mktemp("auth-server")
    (root / "artifacts").mkdir()
    (root / "artifacts/broken").write_text("not a folder")
    config = root / "basic_auth.ini"
    config.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = sqlite:///{root / 'users.db'}\n"
        f"admin_username = {USER}\n"
        f"admin_password = {PASSWORD}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    env = {"MLFLOW_AUTH_CONFIG_PATH": str(config), "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-only-csrf-key"}
    artifacts = ("--artifacts-destination", str(root / "artifacts"), "--serve-artifacts")
    with mlflow_server(f"sqlite:///{root / 'store.db'}", "--app-name", "basic-auth", *artifacts, env=env) as url:
        yield url


@pytest.fixture
def project_with_data(project):
    assert run_in_process([sys.executable, str(REPO / "stages/download.py")], cwd=project).returncode == 0
    return project


@pytest.mark.slow
def test_stages_and_generate_print_and_log_no_password(project, auth_server, tmp_path, monkeypatch):
    # A clone over https with a token: MLflow records the remote as a tag.
    run(["git", "remote", "add", "origin", f"https://{USER}:{TOKEN}@git.example.invalid/sd.git"], cwd=project)
    env = {"MLFLOW_TRACKING_URI": with_credentials(auth_server)}
    repro = run(["dvc", "repro", "train-basic"], cwd=project, env=env)
    info = json.loads((project / "models/basic/run.json").read_text())
    out = tmp_path / "generated"
    generate = run(
        [*GENERATE, "--model", info["model_uri"], "--sampler", "toy", "--out", str(out)], cwd=project, env=env
    )
    assert not leaks(printed(repro) + printed(generate))
    # MLflow's own run link is still there, without the credentials.
    assert f"View run train-basic at: {auth_server}/#/experiments/" in repro.stdout, repro.stdout
    assert (out / "toy-2-seed0.png").is_file()

    import mlflow
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    client = MlflowClient(tracking_uri=auth_server)
    r = client.get_run(info["run_id"])
    assert r.info.status == "FINISHED"
    assert not leaks(json.dumps({**r.data.params, **r.data.tags}))
    logged = Path(client.download_artifacts(r.info.run_id, "", str(tmp_path / "run")))
    mlflow.set_tracking_uri(auth_server)  # a logged model resolves through the global registry URI
    try:
        logged_model = mlflow.artifacts.download_artifacts(info["model_uri"], dst_path=str(tmp_path / "model"))
    finally:
        mlflow.set_tracking_uri(None)
    files = [p for d in (logged, Path(logged_model)) for p in d.rglob("*") if p.is_file()]
    assert any(p.suffix == ".png" for p in files) and any(p.name == "MLmodel" for p in files)
    assert not [p for p in files if leaks(p.read_bytes().decode("latin-1"))]


@pytest.mark.slow
def test_a_queued_experiments_log_holds_no_password(project, auth_server, monkeypatch):
    """`dvc queue logs` keeps what a queued experiment's stages printed, for anyone with the workspace to read."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", with_credentials(auth_server))  # what the queue's workers inherit
    run(["dvc", "exp", "run", "--queue", "-n", "q1", "-S", "basic.max_steps=2", "train-basic"], cwd=project)
    status = run_queue(project, jobs=1)
    logs = run(["dvc", "queue", "logs", "q1"], cwd=project)
    assert "Success" in status, status + logs.stdout
    assert "View run train-basic at:" in logs.stdout and not leaks(printed(logs))


@pytest.mark.slow
def test_wrong_or_missing_credentials_are_one_line_before_any_work(project_with_data, auth_server):
    project = project_with_data
    shown = f"MLFLOW_TRACKING_URI={auth_server}: the tracking server refused"
    stage = [sys.executable, str(REPO / "stages/train_basic.py")]
    cases = [
        (stage, {"MLFLOW_TRACKING_URI": with_credentials(auth_server, password="wrong-" + PASSWORD)}),
        (stage, {"MLFLOW_TRACKING_URI": auth_server}),  # no credentials at all
        (
            [*GENERATE, "--model", "models:/scratch-diffusion-unet2d@champion"],
            {"MLFLOW_TRACKING_URI": auth_server, "MLFLOW_TRACKING_USERNAME": USER, "MLFLOW_TRACKING_PASSWORD": "nope"},
        ),
    ]
    for cmd, env in cases:
        proc = run(cmd, cwd=project, env=env, check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, printed(proc)
        (line,) = proc.stderr.splitlines()
        assert line.startswith(f"error: {shown}") and "MLFLOW_TRACKING_USERNAME" in line, line
        assert "MLFLOW_TRACKING_PASSWORD" in line and "user:password@" in line, line
        assert not leaks(printed(proc)) and "wrong-" not in printed(proc)
    assert not (project / "models").exists()


@pytest.mark.slow
def test_an_unknown_model_on_the_server_is_one_line_without_the_password(tmp_path, auth_server, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    env = {"MLFLOW_TRACKING_URI": with_credentials(auth_server)}
    proc = run([*GENERATE, "--model", "models:/nobody@champion"], cwd=tmp_path, env=env, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, printed(proc)
    assert f"cannot load 'models:/nobody@champion' from {auth_server}" in proc.stderr, proc.stderr
    assert not leaks(printed(proc))


@pytest.mark.slow
def test_a_failed_upload_prints_no_password(project_with_data, auth_server, monkeypatch):
    """The server cannot store this experiment's artifacts: MLflow's error names the URL it called. Last of the server's
    tests: after a failed upload, this MLflow server may stop answering until it is stopped."""
    from mlflow import MlflowClient

    project = project_with_data
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    client = MlflowClient(tracking_uri=auth_server)
    if client.get_experiment_by_name("broken-store") is None:
        client.create_experiment("broken-store", artifact_location="mlflow-artifacts:/broken")
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    write_params(project, {"mlflow": {"experiment": "broken-store"}})
    # No retries, short timeouts: MLflow would retry the failing upload for minutes before it says the same.
    env = {
        "MLFLOW_TRACKING_URI": with_credentials(auth_server),
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    }
    proc = run([sys.executable, str(REPO / "stages/train_basic.py")], cwd=project, env=env, check=False)
    assert proc.returncode != 0 and f"API request to {auth_server}/api/2.0/" in proc.stderr, printed(proc)[-3000:]
    assert not leaks(printed(proc))


def test_shown_uri_hides_userinfo_and_query_values():
    cases = {
        f"http://{USER}:{PASSWORD}@127.0.0.1:5000": "http://127.0.0.1:5000",
        f"https://{TOKEN}@mlflow.example.com/prefix/": "https://mlflow.example.com/prefix/",
        f"https://mlflow.example.com/?token={TOKEN}&team=a": "https://mlflow.example.com/?token=***&team=***",
        f"postgresql://mlflow:{PASSWORD}@db:5432/mlflow": "postgresql://db:5432/mlflow",
        "sqlite:////repo/mlflow.db": "sqlite:////repo/mlflow.db",
        "databricks": "databricks",
    }
    for uri, shown in cases.items():
        assert tracking.shown_uri(uri) == shown


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        (f"http://{USER}:{PASSWORD}@127.0.0.1:9", "the tracking server does not answer"),
        (f"postgresql://mlflow:{PASSWORD}@127.0.0.1:9/mlflow", "the database server does not answer"),
        # MLflow appends its API paths after the query: such a URI never works, so it is refused before a request.
        (
            f"https://127.0.0.1:9/?token={TOKEN}",
            "a query string breaks every call; give a token as MLFLOW_TRACKING_TOKEN",
        ),
    ],
)
def test_a_store_that_cannot_be_used_is_named_without_its_secrets(uri, message):
    start = time.monotonic()
    with pytest.raises(ConnectionError) as e:
        tracking.check_reachable(uri)
    assert str(e.value).startswith(f"MLFLOW_TRACKING_URI={tracking.shown_uri(uri)}: ") and message in str(e.value)
    assert not leaks(str(e.value)) and time.monotonic() - start < 10


def test_credentials_in_param_and_tag_values_are_not_logged(tmp_path, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'store.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    remote = f"https://{USER}:{TOKEN}@git.example.invalid/sd.git"
    try:
        with tracking.start_run("secrets", "r", {"data.source": remote}, {"origin": remote}) as active:
            run_id = active.info.run_id
    finally:
        mlflow.set_tracking_uri(None)
        # start_run selected the experiment of this store for the whole process (a global and an env var).
        mlflow.tracking.fluent._active_experiment_id = None
        os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
    r = MlflowClient(tracking_uri=uri).get_run(run_id)
    assert r.data.params["data.source"] == r.data.tags["origin"] == "https://git.example.invalid/sd.git"
