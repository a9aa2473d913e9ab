"""Atomic writes: a failed write leaves the old file, and nothing else; racing updates lose nothing."""

import json
import subprocess
import sys

import pytest

from scratch_diffusion import files


def test_atomic_path_leaves_nothing_when_the_write_fails(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), files.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]


ADD = """
import sys, time
from scratch_diffusion import files

def add(key):
    def change(results):
        results = results or {}
        time.sleep(0.002)  # widens the window between read and write, where an unlocked update loses the other's
        return {**results, key: True}
    return change

for i in range(40):
    files.update_json(sys.argv[1], add(f"{sys.argv[2]}{i}"))
"""


def test_update_json_keeps_what_two_racing_processes_add(tmp_path):
    target = tmp_path / "results.json"
    procs = [subprocess.Popen([sys.executable, "-c", ADD, str(target), name]) for name in "ab"]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert sorted(json.loads(target.read_text())) == sorted(f"{n}{i}" for n in "ab" for i in range(40))
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_update_json_leaves_the_file_when_the_change_fails(tmp_path):
    target = tmp_path / "results.json"
    files.write_json(target, {"kept": 1})

    def refuse(results):
        raise ValueError("refused")

    with pytest.raises(ValueError, match="refused"):
        files.update_json(target, refuse)
    assert json.loads(target.read_text()) == {"kept": 1}
