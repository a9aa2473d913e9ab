"""Atomic writes: a failed write leaves the old file, and nothing else."""

import pytest

from scratch_diffusion import files


def test_atomic_path_leaves_nothing_when_the_write_fails(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), files.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]
