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


# Fills the disk while a stage output is written: a text output (files.atomic_path) and a model folder
# (model_files.save_unet2d), each over a last good version. Prints what it saw, as JSON: run inside a private
# tmpfs mount, the files are gone when it ends.
FILL = """
import json, resource, signal, sys
from pathlib import Path
from scratch_diffusion import files
from scratch_diffusion.corruption import ddpm_scheduler
from scratch_diffusion.model_files import save_unet2d
from scratch_diffusion.models import UNet2DDenoiser, build_unet

out, how = Path(sys.argv[1]), sys.argv[2]
(out / "metrics.json").write_text("last good")
(out / "unet2d").mkdir()
(out / "unet2d" / "README.md").write_text("last good model")
# 0.4 MB of weights
net = UNet2DDenoiser(build_unet((32,), 1, ("DownBlock2D",), ("UpBlock2D",), sample_size=28, channels=1))
if how == "fsize":  # a file-size limit: writes past 64 KiB fail with EFBIG instead of killing the process
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
meta = {"corruption": "ddpm", "conditioning": "timestep", "objective": "x0"}
errors = []
for write in (
    lambda: files.write_text(out / "metrics.json", "x" * 1_000_000),
    lambda: save_unet2d(out / "unet2d", net, ddpm_scheduler(), meta),
):
    try:
        write()
        errors.append(None)
    except files.DiskFullError as e:
        errors.append(str(e))
print(json.dumps({
    "errors": errors,
    "left": sorted(str(p.relative_to(out)) for p in out.rglob("*")),
    "metrics": (out / "metrics.json").read_text(),
    "model": (out / "unet2d" / "README.md").read_text(),
}))
"""


def _assert_full_disk_reported(seen: dict, out, cause: str) -> None:
    metrics, model = seen["errors"]
    assert metrics == (
        f"{out / 'metrics.json'}: cannot write it, the disk is full ({cause}; file system of {out}); the previous "
        "metrics.json, if any, is left as it was: free some space and rerun"
    )
    assert model.startswith(f"{out / 'unet2d'}: cannot write it, the disk is full (") and "\n" not in model
    # The last good versions stay, and nothing half-written is left beside them.
    assert seen["metrics"] == "last good" and seen["model"] == "last good model"
    assert seen["left"] == ["metrics.json", "unet2d", "unet2d/README.md"]


def test_a_file_size_limit_while_saving_is_one_error_and_the_last_good_files_stay(tmp_path):
    proc = subprocess.run([sys.executable, "-c", FILL, str(tmp_path), "fsize"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    _assert_full_disk_reported(json.loads(proc.stdout), tmp_path, "File too large")


def test_a_full_tmpfs_while_saving_is_one_error_and_the_last_good_files_stay(tmp_path):
    """A real ENOSPC: a 256 KiB tmpfs, mounted in a private mount namespace (needs unprivileged user namespaces)."""
    mount = 'mount -t tmpfs -o size=256k tmpfs "$1" && shift && exec "$@"'
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", mount, "sh", str(tmp_path),
                            "true"], capture_output=True)  # fmt: skip
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {probe.stderr.decode().strip()[:200]}")
    cmd = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", mount, "sh", str(tmp_path)]
    proc = subprocess.run([*cmd, sys.executable, "-c", FILL, str(tmp_path), "tmpfs"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    _assert_full_disk_reported(json.loads(proc.stdout), tmp_path, "No space left on device")
