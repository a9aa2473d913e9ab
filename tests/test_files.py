"""Atomic writes and the generated blocks inside hand-written files."""

import pytest

from scratch_diffusion import files


def test_atomic_path_leaves_nothing_when_the_write_fails(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), files.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]


def test_replace_block_keeps_the_text_around_the_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- t:start -->\nold table\n<!-- t:end -->\nrest\n")
    files.replace_block(readme, "<!-- t:start -->", "<!-- t:end -->", "<!-- t:start -->\nnew\n<!-- t:end -->")
    assert readme.read_text() == "intro\n<!-- t:start -->\nnew\n<!-- t:end -->\nrest\n"


def test_replace_block_without_markers_names_them_and_leaves_the_file(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="README.md lacks the markers <!-- t:start --> ... <!-- t:end -->"):
        files.replace_block(readme, "<!-- t:start -->", "<!-- t:end -->", "x")
    assert readme.read_text() == "no markers\n"
