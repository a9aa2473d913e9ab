"""What a training result depends on, written down so that saved progress is reused only by the run that made it.

A run's identity is the params it reads (flattened, so a difference names its key), the dataset's digest (the
file checksums its manifest lists, which `data.load_split` verifies), the versions of the libraries that compute
(torch, diffusers, accelerate, numpy), and the digest of every source file of the
project that its code can reach: the library modules imported, directly or through one another, from the entry
points given (function-level imports included, as they run when the function does), plus scripts such as the
stage's own file. A checkpoint carries the identity of its run; a rerun with any other identity starts fresh and
says what changed. The number of processes is compared beside it (training.Checkpointing).
"""

from __future__ import annotations

import ast
import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

# The libraries whose arithmetic a result depends on: another version may compute other numbers from the same params,
# data and code. check-params writes them to checks/versions.json, a dependency of every stage that computes.
COMPUTING_LIBRARIES = ("torch", "diffusers", "accelerate", "numpy")

PACKAGE = Path(__file__).resolve().parent
_NAME = PACKAGE.name  # scratch_diffusion


def _imported_modules(path: Path) -> set[str]:
    """The project modules `path` imports anywhere in it, with their parent packages ('a.b.c' -> a, a.b, a.b.c)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
    out = set()
    for name in names:
        parts = name.split(".")
        if parts[0] == _NAME:
            out |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    return out


def _module_file(module: str) -> Path | None:
    base = PACKAGE.joinpath(*module.split(".")[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None  # a name imported from a module (a function, a class), not a module itself


def source_files(entries: Iterable[str | Path]) -> list[Path]:
    """Every project source file reachable by imports from `entries` (files), the entries included."""
    seen: set[Path] = set()
    todo = [Path(e).resolve() for e in entries]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo += [f for m in _imported_modules(path) if (f := _module_file(m)) is not None]
    return sorted(seen)


def _label(path: Path) -> str:
    """A short name for messages: 'objectives.py' inside the library, 'stages/train_basic.py' for a script."""
    if path.is_relative_to(PACKAGE):
        return str(path.relative_to(PACKAGE))
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def code_digests(entries: Iterable[str | Path]) -> dict[str, str]:
    """{file label: sha256 of its bytes} for every source file reachable from `entries`."""
    return {_label(p): hashlib.sha256(p.read_bytes()).hexdigest()[:16] for p in source_files(entries)}


def _plain(value: Any) -> Any:
    """The value as JSON reads it back (tuples become lists), so a stored identity compares equal to a fresh one."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def library_versions() -> dict[str, str]:
    """{library: installed version} of COMPUTING_LIBRARIES."""
    import importlib.metadata as md

    return {name: md.version(name) for name in COMPUTING_LIBRARIES}


def run_identity(params: Mapping[str, Any], data: str, entries: Iterable[str | Path]) -> dict:
    """The identity of a training run: `params` flattened ({'unet2d.lr': 1e-3, ...}), the dataset digest, the code
    reachable from `entries` and the versions of the libraries that compute."""
    code = code_digests(entries)
    return _plain({"params": dict(params), "data": data, "code": code, "versions": library_versions()})


def digest(identity: Mapping) -> str:
    """A short hash of a whole identity, for tags and file metadata."""
    return hashlib.sha256(json.dumps(_plain(identity), sort_keys=True).encode()).hexdigest()[:12]


def _some(names: list[str], what: str) -> str:
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return f"{shown} {what}"


def what_changed(old: Mapping, new: Mapping) -> str:
    """'' when `old` and `new` are the same identity, else what differs in a few words
    ('objectives.py changed', 'unet2d.lr changed; the data changed')."""
    old, new = _plain(old), _plain(new)
    if old == new:
        return ""
    said = []
    params_old, params_new = old.get("params", {}), new.get("params", {})
    keys = sorted(k for k in params_old.keys() | params_new.keys() if params_old.get(k) != params_new.get(k))
    if keys:
        said.append(_some(keys, "changed"))
    if old.get("data") != new.get("data"):
        said.append("the data changed")
    code_old, code_new = old.get("code", {}), new.get("code", {})
    for names, what in (
        (sorted(k for k in code_old.keys() & code_new.keys() if code_old[k] != code_new[k]), "changed"),
        (sorted(code_new.keys() - code_old.keys()), "added"),
        (sorted(code_old.keys() - code_new.keys()), "removed"),
    ):
        if names:
            said.append(_some(names, what))
    for key in sorted((old.keys() | new.keys()) - {"params", "data", "code"}):  # e.g. what the run ran with
        a, b = old.get(key, {}), new.get(key, {})
        if isinstance(a, dict) and isinstance(b, dict):
            said += [f"{key}.{k} {a.get(k)} -> {b.get(k)}" for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]
        elif a != b:
            said.append(f"{key} {a} -> {b}")
    return "; ".join(said) or "made before inputs were recorded"
