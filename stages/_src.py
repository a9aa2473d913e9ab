"""Imported first by every stage: this checkout's src/ goes before any installed copy of the library on sys.path.

DVC hashes the code in the checkout a stage runs in. A queued or `--temp` experiment runs in a copy of the repository
while an editable install points at the workspace, whose code may have changed since the experiment was queued:
without this, the experiment would run the workspace's code and record the copy's hashes.
"""

import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")
if sys.path[:1] != [SRC]:
    sys.path.insert(0, SRC)
