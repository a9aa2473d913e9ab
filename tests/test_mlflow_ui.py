"""The MLflow UI as a person sees it: a real `mlflow server` on 127.0.0.1 over a store filled by real (tiny) training
stages, driven by headless Chromium (Debian's package; Playwright only drives it, nothing is downloaded)."""

import contextlib
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.conftest import REPO, TINY, run, run_in_process, write_params

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # pragma: no cover - the dev extra installs it
    sync_playwright = None

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# No background traffic: this machine's network is closed, and Chromium retries refused connections by the dozen.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-sync",
    "--disable-background-networking",
    "--disable-component-update",
]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sync_playwright is None, reason="playwright is not installed (pip install -e '.[dev]')"),
    pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on PATH (Debian: apt-get install chromium; .ci/run does)"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, proc: subprocess.Popen, timeout: float = 90) -> None:
    """Until GET `url` answers 200 (a health check), or fail with what the process said."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args} exited with {proc.returncode}:\n{proc.stdout.read()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout} s")


@contextlib.contextmanager
def mlflow_process(args: list[str], health: str, cwd=None, timeout: float = 90, env: dict | None = None):
    """`mlflow <args>` listening on a free loopback port (`env` over this process's environment, whose Python's
    scripts are on PATH); yields its URL once `health` answers, then stops it with its process group."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # `mlflow models serve` runs uvicorn
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", *args, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PATH": path, **(env or {})},
        start_new_session=True,  # its own process group: the web server's workers are stopped with it
    )
    try:
        wait_until_up(url + health, proc, timeout)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # the auth app's server may linger on SIGTERM: nothing left to save
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def mlflow_server(backend_uri: str, *args: str, cwd=None, timeout: float = 90, env: dict | None = None):
    """`mlflow server` on a free loopback port (plus `args`); yields its URL once /health answers, then stops it."""
    command = ["server", "--backend-store-uri", backend_uri, *args]
    env = {"MLFLOW_TRACKING_URI": backend_uri, **(env or {})}
    return mlflow_process(command, "/health", cwd=cwd, timeout=timeout, env=env)


@pytest.fixture
def server(project, tmp_path):
    """Two real training runs in a SQLite store, served by `mlflow server` on loopback."""
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    env = {"MLFLOW_TRACKING_URI": uri}
    assert run_in_process([sys.executable, str(REPO / "stages/download.py")], cwd=project).returncode == 0
    write_params(project, {"mlflow": {"log_model": False}})  # the runs are what is shown; the models are not
    for stage in ("train_basic", "train_unet2d"):
        run([sys.executable, str(REPO / f"stages/{stage}.py")], cwd=project, env=env)
    with mlflow_server(uri, cwd=project) as url:
        yield url, MlflowClient(tracking_uri=uri)


def test_runs_loss_and_sample_grid_are_shown(server, tmp_path):
    url, client = server
    experiment = client.get_experiment_by_name("scratch-diffusion")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert {"train-basic", "train-unet2d"} <= set(runs)
    basic = runs["train-basic"].info.run_id

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            expect.set_options(timeout=45_000)  # a 2-core machine renders the UI slowly

            # MLflow 3's UI opens in its GenAI view (traces, judges); as the README says, a person picks "Model
            # training" in the sidebar, which sets `workflowType` (asked for in the URL here: no GenAI page loads
            # first) and the experiment's runs table lists one run per stage.
            ml = "workflowType=machine_learning"
            page.goto(f"{url}/#/experiments/{experiment.experiment_id}/runs?{ml}")
            expect(page.get_by_role("button", name="Model training")).to_be_visible()
            for name in ("train-basic", "train-unet2d"):
                expect(page.get_by_text(name, exact=True).first).to_be_visible()
            page.screenshot(path=tmp_path / "experiment.png", full_page=True)

            # One training run: its params, its loss metric...
            page.goto(f"{url}/#/experiments/{experiment.experiment_id}/runs/{basic}?{ml}")
            expect(page.get_by_text("basic.batch_size", exact=True)).to_be_visible()
            expect(page.get_by_role("link", name="loss", exact=True)).to_be_visible()
            # ... and, under Model metrics, the loss chart and the sample grid, fetched from the run's artifacts.
            page.get_by_role("tab", name="Model metrics").click()
            expect(page.get_by_text("loss", exact=True).first).to_be_visible()
            # The card's image (rc-image, as MLflow's image cards draw it; its source is fetched from the run's
            # artifacts into a blob URL).
            grid = page.locator("img.rc-image-img").first
            expect(grid).to_be_visible()
            page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=grid.element_handle())
            # The card shows a thumbnail (at most 225 pixels, under the run's params); a click opens the image view
            # with the logged grid itself, which must be whole on screen and readable.
            grid.scroll_into_view_if_needed()
            last = str(TINY["basic"]["max_steps"])  # the slider dragged to its end: the trained model's grid
            thumb = page.get_by_role("slider").last.bounding_box()
            page.mouse.move(thumb["x"] + 7, thumb["y"] + 7)
            page.mouse.down()
            page.mouse.move(thumb["x"] + 300, thumb["y"] + 7, steps=10)
            page.mouse.up()
            expect(page.get_by_role("spinbutton").last).to_have_value(last)  # the card's step box
            grid = page.locator("img.rc-image-img").first
            expect(grid).to_be_visible()
            thumb_src = grid.get_attribute("src")
            grid.click()
            full = page.locator("img.rc-image-preview-img").last
            expect(full).to_be_visible()
            # The view opens on the card's thumbnail and fetches the logged image only then: wait for the swap (a
            # person sees it after a moment; a slow machine takes longer than the opening animation).
            page.wait_for_function(
                """thumb => {
                    const img = [...document.querySelectorAll("img.rc-image-preview-img")].pop();
                    return img && img.complete && img.naturalWidth > 0 && img.src !== thumb;
                }""",
                arg=thumb_src,
            )
            page.wait_for_timeout(500)  # the opening animation
            natural = full.evaluate("img => [img.naturalWidth, img.naturalHeight]")
            box = full.bounding_box()
            # Whole: each corner of the grid is the grid itself on screen (not clipped, not covered).
            corners = [(box["x"] + dx, box["y"] + dy) for dx in (3, box["width"] - 3) for dy in (3, box["height"] - 3)]
            on_top = [
                full.evaluate("(img, [x, y]) => document.elementFromPoint(x, y) === img", [x, y]) for x, y in corners
            ]
            shot = tmp_path / "run.png"
            page.screenshot(path=shot)
            if os.environ.get("MLFLOW_UI_SCREENSHOT"):  # retake the README's picture: the same view, as tested
                shutil.copyfile(shot, os.environ["MLFLOW_UI_SCREENSHOT"])
        finally:
            browser.close()
    viewport = {"width": 1400, "height": 1100}
    inside = box["x"] >= 0 and box["x"] + box["width"] <= viewport["width"] and box["y"] >= 0
    assert inside and box["y"] + box["height"] <= viewport["height"], f"grid not whole on screen: {box}"
    assert all(on_top), f"grid clipped or covered at its corners {corners}: {on_top}"
    # Readable: upscaled 3x with nearest neighbours (a 30-pixel cell, digit and padding, becomes 90), a caption band
    # above, and each 28-pixel digit shown at 56 screen pixels or more.
    cols = math.ceil(math.sqrt(TINY["basic"]["sample_n"]))
    assert natural[0] == 3 * (cols * 30 + 2) and natural[1] > natural[0], f"not a 3x captioned grid: {natural}"
    digit_px = box["width"] * 84 / natural[0]
    assert digit_px >= 56, f"digits shown at {digit_px:.0f} px: too small to read"
    print(f"screenshots: {tmp_path / 'experiment.png'} {shot}")
