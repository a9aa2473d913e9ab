"""Writing outputs atomically: a crash never leaves a half-written file where a stage output belongs, and two
processes adding to one results file never lose each other's additions."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

# No space left on the device, the user's quota spent, or a file larger than the process may write (RLIMIT_FSIZE):
# each means the output does not fit, and each is reported alike.
FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class DiskFullError(OSError):
    """An output did not fit on its file system; what was there before is left as it was. stage.run_stage prints
    the message as one line."""


def _is_full(e: BaseException, where: Path) -> bool:
    """Whether `e`, raised while writing under `where`, means that the disk is full. Writers say so differently:
    Python and PIL raise OSError with the errno, safetensors a SafetensorError that ends in "(os error 28)", torch a
    RuntimeError that names no cause (then the file system itself is asked whether any space is left)."""
    if isinstance(e, OSError) and e.errno in FULL:
        return True
    if any(f"(os error {n})" in str(e) for n in FULL):
        return True
    try:
        return os.statvfs(where).f_bavail == 0
    except (OSError, AttributeError):  # gone, or no statvfs (Windows)
        return False


@contextmanager
def disk_full_reported(path: str | Path, folder: str | Path | None = None) -> Iterator[None]:
    """Turn a failed write under `folder` (default: beside `path`) that failed for lack of space into one
    DiskFullError naming `path`; other errors pass as they are. Leave the partial output in place until this block
    has exited: the last check (is any space left?) counts the space it takes."""
    path = Path(path)
    folder = Path(folder or path.parent)
    try:
        yield
    except DiskFullError:
        raise
    except Exception as e:
        if not _is_full(e, folder):
            raise
        code = e.errno if isinstance(e, OSError) else next((n for n in FULL if f"(os error {n})" in str(e)), None)
        cause = os.strerror(code) if code in FULL else "no space left"
        raise DiskFullError(
            f"{path}: cannot write it, the disk is full ({cause}; file system of {folder.resolve()}); the previous "
            f"{path.name}, if any, is left as it was: free some space and rerun"
        ) from None


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds. A disk that fills
    meanwhile is one DiskFullError, with `path` as it was."""
    path = Path(path)
    with disk_full_reported(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with disk_full_reported(path):
            yield Path(tmp)
            os.chmod(tmp, 0o644)  # mkstemp makes files private; outputs are not
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_tsv(path: str | Path, header: list[str], rows) -> None:
    lines = ["\t".join(header)] + ["\t".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in r) for r in rows]
    write_text(path, "\n".join(lines) + "\n")


def update_json(path: str | Path, change: Callable[[dict | None], dict]) -> dict:
    """Read `path` (None when missing), write `change(that)` in its place, atomically, and return it. An exclusive
    lock beside the file spans the read and the write: two processes updating it at once would otherwise each write
    back what they read, and the one that writes last drops the other's addition. POSIX only; elsewhere unlocked."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        new = change(json.loads(path.read_text()) if path.is_file() else None)
        write_json(path, new)
    return new
