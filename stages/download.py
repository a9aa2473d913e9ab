"""download: fetch MNIST or FashionMNIST, or convert a folder of images, into data/dataset with a checksum manifest.

    dvc repro download
    python stages/download.py

Reads params `data.dataset`, `data.source` and, for an image folder, `data.resolution`, `data.channels`,
`data.held_out`, `data.background`. Writes `data/dataset/<MNIST|FashionMNIST|ImageFolder>/raw/*-ubyte` and
`data/dataset/manifest.json` (md5 of every file, and of every source image, and for a folder what was skipped and how
its pictures were decoded) and, in metrics/cost/download.json, the source the files came from. Nothing is left behind
if every source fails.
"""

import _src  # noqa: F401 (first: this checkout's src/, see stages/_src.py)

from scratch_diffusion.config import load_params
from scratch_diffusion.data import download
from scratch_diffusion.stage import run_stage

DATA_ROOT = "data/dataset"


def main() -> dict:
    d = load_params().data
    manifest = download(
        d.dataset,
        d.source,
        DATA_ROOT,
        resolution=d.resolution,
        channels=d.channels,
        held_out=d.held_out,
        background=d.background,
    )
    # Where the files came from is provenance (metrics/cost/download.json), not part of the dataset: the same bytes
    # from another folder or mirror are the same data/dataset, and nothing downstream reruns for them.
    return {"source": manifest["source"]}


if __name__ == "__main__":
    run_stage(main)
