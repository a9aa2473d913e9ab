"""`scratch-diffusion generate`: bad options and unreachable stores are one line each, before any sampling."""

import pathlib
import subprocess
import sys
import time

import mlflow
import pytest
import torch

from tests.conftest import run

GENERATE = [sys.executable, "-m", "scratch_diffusion", "generate", "--steps", "2", "--n", "2"]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def test_out_that_is_a_file_or_under_one_is_refused_before_loading_the_model(workdir):
    (workdir / "taken").write_text("mine")
    # The model does not exist either: the output path is checked first, so that is what is reported.
    for out, message in (("taken", "--out: 'taken' is a file"), ("taken/sub", "--out: cannot create 'taken/sub'")):
        proc = run([*GENERATE, "--model", "nowhere", "--out", out], cwd=workdir, check=False)
        assert proc.returncode == 2 and message in proc.stderr.splitlines()[-1], proc.stderr
        assert "Traceback" not in proc.stderr
    assert (workdir / "taken").read_text() == "mine"


def test_unreachable_tracking_server_fails_in_seconds_and_leaves_no_files(workdir):
    start = time.monotonic()
    proc = run(
        [*GENERATE, "--model", "models:/scratch-diffusion-unet2d/1"],
        cwd=workdir,
        check=False,
        env={"MLFLOW_TRACKING_URI": "http://user:s3cret@127.0.0.1:9"},
    )
    assert proc.returncode == 2 and time.monotonic() - start < 60
    assert "MLFLOW_TRACKING_URI=http://127.0.0.1:9: the tracking server does not answer" in proc.stderr
    assert "s3cret" not in proc.stderr + proc.stdout
    assert sorted(p.name for p in workdir.iterdir()) == ["generated"]  # no metrics/cost/ left behind


def test_a_truncated_model_folder_is_one_line(workdir):
    model = workdir / "models/basic"
    model.mkdir(parents=True)
    (model / "model.safetensors").write_bytes(b"\x00" * 20)
    proc = run([*GENERATE, "--model", "models/basic", "--sampler", "toy"], cwd=workdir, check=False)
    assert proc.returncode == 2 and "not a readable BasicUNet" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr


def test_a_live_server_with_credentials_in_the_uri_is_reachable(workdir):
    """user:password@ in the URI goes in an Authorization header; the check must not refuse a live server."""
    code = """
import base64, http.server, sys
want = "Basic " + base64.b64encode(b"user:s3cret").decode()
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.headers.get("Authorization") == want else 401)
        self.end_headers()
    def log_message(self, *a): pass
s = http.server.HTTPServer(("127.0.0.1", 0), H)
print(s.server_port, flush=True)
s.serve_forever()
"""
    server = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())
        from scratch_diffusion.tracking import check_reachable

        check_reachable(f"http://user:s3cret@127.0.0.1:{port}")  # answers 200 with the header, 401 without
        check_reachable(f"http://127.0.0.1:{port}/")  # 401: it answered, so it is there
    finally:
        server.kill()
    with pytest.raises(ConnectionError, match="does not answer"):
        check_reachable(f"http://user:s3cret@127.0.0.1:{port}")


class Booby(torch.nn.Module):
    """A registered model whose pickle runs code when loaded: it touches a marker file."""

    marker = ""

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_a_registry_model_is_never_unpickled(workdir):
    store = f"sqlite:///{workdir / 'store.db'}"
    mlflow.set_tracking_uri(store)
    booby = Booby()
    booby.marker = str(workdir / "ran-foreign-code")
    with mlflow.start_run():
        mlflow.pytorch.log_model(
            booby,
            name="model",
            registered_model_name="booby",
            pip_requirements=["torch"],
            serialization_format="pickle",
        )
    assert not (workdir / "ran-foreign-code").exists()
    proc = run([*GENERATE, "--model", "models:/booby/1"], cwd=workdir, check=False, env={"MLFLOW_TRACKING_URI": store})
    assert proc.returncode == 2 and "refused (unpickling a registry model runs its code)" in proc.stderr, proc.stderr
    assert not (workdir / "ran-foreign-code").exists()
