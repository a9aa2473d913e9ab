"""What serving costs over drawing in-process: one request through `mlflow models serve` against the same images
drawn as `scratch-diffusion generate` draws them, on the same machine. Prints the ratio.

    python benchmarks/serve.py                     # 16 images, DDIM-50 with eta 1 (the logged model's default)
    python benchmarks/serve.py --model models/unet2d --n 64 --report

The model is logged into a throwaway MLflow store by the training stages' own entry (serving.log_model)
and served from there on loopback. Without a trained folder (`models/unet2d` after `dvc repro`), the lesson's
UNet2DModel as params.yaml builds it, untrained: a model call costs the same whatever the weights. Requests and
in-process draws alternate (A B A B), after one warm-up each; medians. The server answers in JSON, so its time
includes encoding the images as lists and the client's decoding (`np.asarray(answer["predictions"], np.uint8)`).
Not part of the test suite: timings belong here, never in a test.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch
from speed import Tee, machine, machine_class

from scratch_diffusion import serving, tracking
from scratch_diffusion.cli import ScriptParser, refuse
from scratch_diffusion.config import load_params
from scratch_diffusion.files import write_text
from scratch_diffusion.model_files import save_unet2d
from scratch_diffusion.models.unet2d import UNet2DDenoiser, build_unet
from scratch_diffusion.recipe import noise_schedule, unet2d_meta

ROOT = Path(__file__).resolve().parents[1]
CHANNELS, SIDE = 1, 28  # the lesson's network: MNIST's grey 28 x 28 images


def lesson_unet_folder(folder: Path) -> Path:
    params = load_params(ROOT / "params.yaml")
    u = params.unet2d
    torch.manual_seed(0)
    unet = build_unet(
        u.block_out_channels, u.layers_per_block, u.down_block_types, u.up_block_types, sample_size=SIDE, channels=1
    )
    meta = {**unet2d_meta(params), "dataset": "mnist", "resolution": SIDE, "channels": CHANNELS}
    save_unet2d(folder, UNet2DDenoiser(unet, u.conditioning), noise_schedule(params), meta)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served(model_uri: str, env: dict):
    port = free_port()
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local"]
        + ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env={**os.environ, **env, "PATH": path},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    refuse(f"mlflow models serve did not start (exit {proc.poll()})")
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def post(url: str, request: dict) -> np.ndarray:
    body = json.dumps({"inputs": request}).encode()
    with urllib.request.urlopen(
        urllib.request.Request(f"{url}/invocations", body, {"Content-Type": "application/json"}), timeout=600
    ) as r:
        return np.asarray(json.loads(r.read())["predictions"], dtype=np.uint8)


def run(args) -> None:
    print(f"# benchmarks/serve.py\n{machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = Path(args.model) if args.model else lesson_unet_folder(tmp / "unet2d")
        what = args.model or "the lesson's UNet2DModel from params.yaml, untrained"
        uri = f"sqlite:///{tmp / 'mlflow.db'}"
        os.environ["MLFLOW_TRACKING_URI"] = uri
        tracking.connect()
        import mlflow

        mlflow.set_experiment(experiment_id=mlflow.create_experiment("bench", (tmp / "artifacts").as_uri()))
        model = serving.load(folder)
        params = load_params(ROOT / "params.yaml")
        defaults = params.serve.defaults(model.corruption, bool(model.classes))
        with mlflow.start_run():
            serving.log_model(
                folder,
                image_shape=model.image_shape,
                defaults=defaults,
                max_images=max(args.n, params.serve.max_images),
                registered_name="bench",
            )
        request = {"n": args.n, "seed": 0, "sampler": args.sampler, "steps": args.steps, "eta": args.eta}
        checked = serving.check_request(model, request, defaults)
        print(f"model: {what}; request: {json.dumps(request)}")

        def in_process() -> np.ndarray:
            return serving.draw(model, checked)[0]

        with served("models:/bench/1", {"MLFLOW_TRACKING_URI": uri}) as url:
            post(url, {**request, "n": 1, "steps": 2})  # the server's first request warms it, as in_process's
            in_process_first = in_process()
            times = {"server": [], "generate": []}
            for _ in range(args.repeats):
                for name, call in (("server", lambda: post(url, request)), ("generate", in_process)):
                    start = time.perf_counter()
                    images = call()
                    times[name].append(time.perf_counter() - start)
                    assert np.array_equal(images, in_process_first), f"{name} drew other images"
    server, drawn = (statistics.median(times[k]) for k in ("server", "generate"))
    runs = lambda k: ", ".join(f"{t:.2f}" for t in times[k])  # noqa: E731
    print(f"server request  {server:.2f} s (runs: {runs('server')})")
    print(f"generate's draw {drawn:.2f} s (runs: {runs('generate')}); same images, bit for bit")
    print(f"ratio server / generate: {server / drawn:.3f}x")


def main() -> None:
    parser = ScriptParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="a trained model folder (default: models/unet2d if present)")
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--sampler", default="ddim")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--eta", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--report", action="store_true", help="also write it to docs/performance/serving-<class>.md")
    args = parser.parse_args()
    for name, lo, hi in (("n", 1, 10_000), ("steps", 1, 1000), ("repeats", 1, 100)):
        if not lo <= getattr(args, name) <= hi:
            parser.error(f"--{name}: got {getattr(args, name)}, allowed: {lo}..{hi}")
    if args.model is None and (ROOT / "models/unet2d/scratch_diffusion.json").is_file():
        args.model = str(ROOT / "models/unet2d")
    report = io.StringIO()
    try:
        with contextlib.redirect_stdout(Tee(sys.stdout, report)):
            run(args)
    except serving.RequestError as e:  # e.g. a sampler the model does not take
        parser.error(e.named(f"--{e.field}"))
    if not args.report:
        return
    command = " ".join(["python benchmarks/serve.py", *sys.argv[1:]])
    text = f"# Serving benchmark: {machine_class()}\n\nWritten by `{command}`; each figure is this machine's.\n\n"
    out = ROOT / "docs/performance" / f"serving-{machine_class().lower()}.md"
    write_text(out, f"{text}```\n{report.getvalue()}```\n")


if __name__ == "__main__":
    main()
