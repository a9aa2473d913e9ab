"""A run's identity: which params, data and code a training result depends on, and what changed between two."""

import shutil

from scratch_diffusion import identity
from scratch_diffusion.identity import code_digests, digest, run_identity, source_files, what_changed
from tests.conftest import REPO

PACKAGE = REPO / "src" / "scratch_diffusion"


def test_the_code_of_a_training_is_every_project_file_it_reaches():
    files = {str(p.relative_to(REPO)) for p in source_files([REPO / "stages/train_unet2d.py"])}
    # Through recipe.py to the loss, the network and the loop; lazily imported modules count too.
    for needed in ("objectives.py", "models/unet2d.py", "training.py", "corruption.py", "data.py", "identity.py"):
        assert f"src/scratch_diffusion/{needed}" in files, needed
    assert "stages/train_unet2d.py" in files
    # The judge's modules are not part of a diffusion model's training.
    assert "src/scratch_diffusion/compare_report.py" not in files


def test_what_changed_names_the_key_the_file_or_the_data():
    base = run_identity({"unet2d.lr": 1e-3, "seed": 42}, "d1", [PACKAGE / "recipe.py"])
    assert what_changed(base, base) == ""
    assert what_changed(base, {**base, "params": {**base["params"], "unet2d.lr": 2e-3}}) == "unet2d.lr changed"
    assert what_changed(base, {**base, "data": "d2"}) == "the data changed"
    code = dict(base["code"])
    code["objectives.py"] = "0" * 16
    code["new.py"] = "1" * 16
    assert what_changed(base, {**base, "code": code}) == "objectives.py changed; new.py added"
    assert what_changed({}, base) != "" and digest(base) != digest({**base, "data": "d2"})


def test_a_changed_source_file_changes_the_code_digest(tmp_path, monkeypatch):
    copy = tmp_path / "scratch_diffusion"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(identity, "PACKAGE", copy)
    before = code_digests([copy / "recipe.py"])
    (copy / "objectives.py").write_text((copy / "objectives.py").read_text() + "\n# edited\n")
    after = code_digests([copy / "recipe.py"])
    assert what_changed({"code": before}, {"code": after}) == "objectives.py changed"


def test_another_version_of_a_computing_library_is_another_identity():
    """A checkpoint of another torch (or diffusers, accelerate, numpy) is not resumed: the same params, data and
    code may compute other numbers there. check-params writes the same versions for DVC (checks/versions.json)."""
    from importlib import metadata

    base = run_identity({"seed": 42}, "d1", [PACKAGE / "recipe.py"])
    assert base["versions"] == {name: metadata.version(name) for name in ("torch", "diffusers", "accelerate", "numpy")}
    other = {**base, "versions": {**base["versions"], "torch": "9.9.9"}}
    assert what_changed(base, other) == f"versions.torch {base['versions']['torch']} -> 9.9.9"
    assert digest(base) != digest(other)
