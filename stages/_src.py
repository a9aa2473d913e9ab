"""Imported first by every stage: this checkout's src/ goes before any installed copy of the library on sys.path, and
an interpreter without the project's dependencies stops here in one line.

DVC hashes the code in the checkout a stage runs in. A queued or `--temp` experiment runs in a copy of the repository
while an editable install points at the workspace, whose code may have changed since the experiment was queued:
without this, the experiment would run the workspace's code and record the copy's hashes. And `python` on PATH may be
another interpreter than the project's (no environment activated): without the check, the first import of torch
would end in a traceback.
"""

import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = str(ROOT / "src")
if sys.path[:1] != [SRC]:
    sys.path.insert(0, SRC)


def _missing() -> list[str]:
    """The distributions pyproject.toml depends on that this interpreter does not have."""
    wanted = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = [re.split(r"[<>=!~ ;\[]", spec, maxsplit=1)[0] for spec in wanted]
    missing = []
    for name in names:
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    return missing


if missing := _missing():
    print(
        f"error: {sys.executable} lacks {', '.join(missing)} (pyproject.toml's dependencies): run the pipeline with "
        "the project's environment (`bash .ci/setup dvc repro`, or activate .venv first)",
        file=sys.stderr,
    )
    sys.exit(2)
