"""`scratch-diffusion generate`: bad options and unreachable stores are one line each, before any sampling."""

import pathlib
import subprocess
import sys
import time

import mlflow
import numpy as np
import pytest
import torch

from tests.conftest import run, run_in_process

GENERATE = [sys.executable, "-m", "scratch_diffusion", "generate", "--steps", "2", "--n", "2"]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def test_out_that_is_a_file_or_under_one_is_refused_before_loading_the_model(workdir):
    (workdir / "taken").write_text("mine")
    # The model does not exist either: the output path is checked first, so that is what is reported.
    for out, message in (("taken", "--out: 'taken' is a file"), ("taken/sub", "--out: cannot create 'taken/sub'")):
        proc = run_in_process([*GENERATE, "--model", "nowhere", "--out", out], cwd=workdir)
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
    assert sorted(p.name for p in workdir.iterdir()) == []  # no output folder, no metrics/cost/ left behind


def test_a_truncated_model_folder_is_one_line(workdir):
    model = workdir / "models/basic"
    model.mkdir(parents=True)
    (model / "model.safetensors").write_bytes(b"\x00" * 20)
    (model / "scratch_diffusion.json").write_text('{"resolution": 28, "channels": 1}')
    proc = run_in_process([*GENERATE, "--model", "models/basic", "--sampler", "toy"], cwd=workdir)
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
        # A 401 is a server that is there but refuses: one line saying what to set, not MLflow's traceback later.
        with pytest.raises(ConnectionError, match="refused a request without credentials.*MLFLOW_TRACKING_USERNAME"):
            check_reachable(f"http://127.0.0.1:{port}/")
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


def basic_model(workdir: pathlib.Path) -> None:
    """An untrained BasicUNet in the folder layout train-basic writes: enough for generate to run."""
    from scratch_diffusion.model_files import save_basic
    from scratch_diffusion.models import BasicUNet

    torch.manual_seed(0)
    meta = {"dataset": "mnist", "resolution": 28, "channels": 1, "classes": [str(d) for d in range(10)]}
    save_basic(workdir / "models/basic", BasicUNet(1, 1, 28), meta)


def test_a_seed_out_of_range_is_one_line(workdir, monkeypatch, capsys):
    """A seed torch cannot take (2**70) was a traceback after the model had loaded; a negative one was used."""
    from scratch_diffusion.cli import main as cli_main

    basic_model(workdir)
    monkeypatch.chdir(workdir)
    for seed in (2**70, -1):
        with pytest.raises(SystemExit) as exit_info:
            cli_main(["generate", "--model", "models/basic", "--sampler", "toy", "--steps", "2", "--seed", str(seed)])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.count("\n") == 1, err  # one line: no usage block, no traceback
        assert err.splitlines()[-1].endswith(
            f"--seed: got {seed}, allowed: 0..4294967295 (as params.yaml's sample.seed)"
        )
    assert not (workdir / "generated").exists()


def test_a_basic_model_draws_the_shape_its_folder_records(workdir, monkeypatch):
    """An RGB BasicUNet of 12 px: generate's npz and PNG are of that shape, not MNIST's."""
    from PIL import Image

    from scratch_diffusion.cli import main as cli_main
    from scratch_diffusion.model_files import save_basic
    from scratch_diffusion.models import BasicUNet

    torch.manual_seed(0)
    meta = {"dataset": "folder", "resolution": 12, "channels": 3, "classes": []}
    save_basic(workdir / "models/basic", BasicUNet(3, 3, sample_size=12), meta)
    monkeypatch.chdir(workdir)
    cli_main(["generate", "--model", "models/basic", "--sampler", "toy", "--steps", "2", "--n", "3"])
    assert np.load(workdir / "generated/toy-2-seed0.npz")["images"].shape == (3, 12, 12, 3)
    with Image.open(workdir / "generated/toy-2-seed0.png") as img:
        assert img.mode == "RGB"


def test_all_timesteps_with_a_multistep_solver_is_refused_for_the_model(workdir):
    """DPM-Solver++ asked for every timestep of the model's schedule crashed (IndexError) after loading."""
    from scratch_diffusion.corruption import ddpm_scheduler
    from scratch_diffusion.model_files import save_unet2d
    from scratch_diffusion.models import UNet2DDenoiser, build_unet

    net = UNet2DDenoiser(build_unet((32,), 1, ("DownBlock2D",), ("UpBlock2D",), sample_size=28, channels=1))
    meta = {"corruption": "ddpm", "conditioning": "timestep", "objective": "x0"}
    save_unet2d(workdir / "models/unet2d", net, ddpm_scheduler(10, prediction_type="sample"), meta)
    proc = run_in_process([*GENERATE[:-4], "--sampler", "dpmsolver++", "--steps", "10", "--n", "2"], cwd=workdir)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert (
        "--steps: got 10, allowed: 1..9 for this model (dpmsolver++ fails or draws NaN at all of them)" in proc.stderr
    )


def test_a_disk_that_fills_while_generating_is_one_line_and_the_last_file_stays(workdir):
    """RLIMIT_FSIZE makes every file write past 1 byte fail (EFBIG), as a full disk fails with ENOSPC."""
    import resource
    import signal

    basic_model(workdir)
    last = workdir / "generated/toy-2-seed0.npz"
    last.parent.mkdir()
    last.write_bytes(b"last good")

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process instead of failing the write
        resource.setrlimit(resource.RLIMIT_FSIZE, (1, 1))

    cmd = [*GENERATE, "--model", "models/basic", "--sampler", "toy"]
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, preexec_fn=limit_file_size)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(
        f"error: {pathlib.Path('generated/toy-2-seed0.npz')}: cannot write it, the disk is full"
    )
    assert last.read_bytes() == b"last good" and sorted(p.name for p in last.parent.iterdir()) == [last.name]
