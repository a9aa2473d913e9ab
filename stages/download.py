"""download: fetch MNIST (or FashionMNIST) into data/dataset in torchvision's layout, with a checksum manifest.

    dvc repro download
    python stages/download.py

Reads params `data.dataset`, `data.source`. Writes `data/dataset/<MNIST|FashionMNIST>/raw/*-ubyte` and
`data/dataset/manifest.json` (source used, md5 of every file). Nothing is left behind if every source fails.
"""

from scratch_diffusion.config import load_params
from scratch_diffusion.data import download
from scratch_diffusion.stage import run_stage

DATA_ROOT = "data/dataset"


def main() -> None:
    params = load_params()
    download(params.data.dataset, params.data.source, DATA_ROOT)


if __name__ == "__main__":
    run_stage(main)
