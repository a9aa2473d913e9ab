"""Writing outputs atomically: a crash never leaves a half-written file where a stage output belongs, and two
processes adding to one results file never lose each other's additions."""

from __future__ import annotations

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


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
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
