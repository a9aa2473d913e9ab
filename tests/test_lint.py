"""The code passes the project's linter and formatter (ruff, configured in pyproject.toml, its version pinned in the
dev extra so that every machine formats alike): CI runs both through this test."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

CODE = ["src", "stages", "tests", "benchmarks", "ablations"]


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["check", "format"])
def test_ruff_is_clean(command):
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e '.[dev]')")
    proc = subprocess.run([ruff, *command, *CODE], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
