"""Measured runs on data other than MNIST, for docs/own_images.md (regenerated from here, never typed by hand).

    python ablations/own_images.py run              # each dataset below as a `dvc exp run --temp`, then `table`
    python ablations/own_images.py run --only shapes
    python ablations/own_images.py table            # ablations/own_images.json -> docs/own_images.md

- `fashion`: FashionMNIST at the lesson's budget (params.yaml's defaults), read from the folder of IDX files that
  Debian's package `dataset-fashion-mnist` installs (no other internet needed);
- `shapes`: a generated labelled RGB folder (data.make_shapes: coloured circles, squares and triangles), 32 x 32,
  three classes, through the folder source exactly as a user's own images go;
- `emoji`: a real collection nobody here made, as people have pictures: Apple's emoji from npm's
  `emoji-datasource-apple` (64 x 64 RGBA PNGs on a transparent ground), one class folder per Unicode category
  ("Smileys & Emotion", "Flags", ...: ten classes of very different sizes), run with the README's command as written.

Each is an ordinary DVC experiment (`dvc exp show` lists it; `dvc exp apply own-shapes` brings it to the workspace).
Its FIDs are measured by a judge trained on its own dataset: they compare settings within a dataset, never across.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from scratch_diffusion import files
from scratch_diffusion.cli import ScriptParser, refuse
from scratch_diffusion.data import make_shapes
from scratch_diffusion.hardware import machine

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import ROOT, _data, dvc, experiments_from_show  # noqa: E402 (the ablation's own dvc helpers)

RESULTS = ROOT / "ablations" / "own_images.json"
DOC = ROOT / "docs" / "own_images.md"
FASHION = Path("/usr/share/datasets/fashion-mnist")
SHAPES = ROOT / "data" / "shapes"  # generated, not in git (like every dataset here)
SHAPES_PER_CLASS = 2000
EMOJI = ROOT / "data" / "emoji"
EMOJI_PACKAGE = "emoji-datasource-apple@16.0.0"  # pinned: the same pictures in every run

DATASETS = {
    "fashion": {"data.dataset": "fashion_mnist", "data.source": str(FASHION)},
    "shapes": {
        "data.dataset": "folder",
        "data.source": str(SHAPES),
        "data.resolution": 32,
        "data.channels": 3,
        "sample.n": 250,  # the held-out tenth of 6000 images is 600: n <= 300
        # The budget docs/own_images.md was measured at, 3 epochs of 5,400 images (auto would train 33).
        "basic.epochs": 3,
        "unet2d.epochs": 3,
        "classifier.epochs": 3,
    },
    # The README's own-images command, nothing else: the budget and n are what a user gets by default.
    "emoji": {"data.dataset": "folder", "data.source": str(EMOJI), "data.resolution": 32, "data.channels": 3},
}


def make_emoji(folder: Path) -> None:
    """Apple's emoji (every picture the package ships at 64 x 64, skin tones included) into one folder per category,
    from the npm registry's tarball (`npm pack`; its files are read as data, nothing in it runs)."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["npm", "pack", "--silent", EMOJI_PACKAGE], cwd=tmp, check=True, stdout=subprocess.DEVNULL)
        (tarball,) = Path(tmp).glob("*.tgz")
        with tarfile.open(tarball) as tar:
            tar.extractall(tmp, filter="data")
        package = Path(tmp) / "package"
        staging = folder.with_name(folder.name + ".partial")
        for entry in json.loads((package / "emoji.json").read_text()):
            variants = [entry, *(entry.get("skin_variations") or {}).values()]
            for v in (v for v in variants if v.get("has_img_apple")):
                target = staging / entry["category"] / v["image"]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes((package / "img/apple/64" / v["image"]).read_bytes())
        staging.rename(folder)  # whole or not at all: a half-written folder would be a different dataset


def run(only: list[str], note: str = "") -> None:
    for name in only:
        if name == "fashion" and not (FASHION / "train-images-idx3-ubyte.gz").is_file():
            refuse(f"{FASHION}: not found; install it with `apt-get install dataset-fashion-mnist`")
    for name in only:
        if name == "shapes" and not SHAPES.is_dir():
            make_shapes(SHAPES, per_class=SHAPES_PER_CLASS)
        if name == "emoji" and not EMOJI.is_dir():
            make_emoji(EMOJI)
        sets = [arg for key, value in DATASETS[name].items() for arg in ("-S", f"{key}={value}")]
        print(f"own_images: dvc exp run --temp -n own-{name} {' '.join(sets)}", flush=True)
        dvc("exp", "run", "--temp", "-f", "-n", f"own-{name}", *sets)
    collect(note, tuple(only))
    table()


def collect(note: str = "", noted: tuple[str, ...] = ()) -> None:
    """Every own-* experiment's results into ablations/own_images.json; `note` (how it was measured, e.g. on a
    machine shared with other work) goes with the datasets in `noted`."""
    show = json.loads(dvc("exp", "show", "--json", capture=True))
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for _, rev in experiments_from_show(show):
        if not rev["name"].startswith("own-"):
            continue
        compare = _data(rev, "metrics", "metrics/compare.json")
        judge = _data(rev, "metrics", "metrics/classifier.json")
        cost = {
            s: _data(rev, "metrics", f"metrics/cost/{s}.json").get("wall_s") for s in ("train-basic", "train-unet2d")
        }
        results[rev["name"].removeprefix("own-")] = {
            # Paths inside the repository as a clone has them (data/shapes), not where this one was measured.
            "params": {
                k: str(v).replace(f"{ROOT}/", "") for k, v in DATASETS[rev["name"].removeprefix("own-")].items()
            },
            "n": compare["n"],
            "floor_fid": compare["real_floor_fid"],
            "real_recognised": compare["real_recognised"],
            "judge_accuracy": judge.get("test_accuracy"),
            "settings": compare["settings"],
            "train_wall_s": cost,
            "machine": machine(),
            **({"note": note} if note and rev["name"].removeprefix("own-") in noted else {}),
        }
    files.write_json(RESULTS, results)


def _fmt(m: dict, key: str) -> str:
    if m.get(key) is None:
        return "n/a"
    lo, hi = m.get(f"{key}_lo"), m.get(f"{key}_hi")
    return f"{m[key]:.1f} [{lo:.1f}, {hi:.1f}]" if lo is not None else f"{m[key]:.3g}"


def table() -> None:
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    lines = [
        "# Beyond MNIST: measured runs on other data",
        "",
        "Generated by `python ablations/own_images.py run` (each dataset one `dvc exp run` at params.yaml's budget,",
        "the lesson's 3 epochs); the numbers are the compare stage's, each FID with its 95% interval. A dataset's",
        "FIDs are measured by the judge trained on that dataset (its test accuracy says how far to trust it) and are",
        "on that judge's scale: compare settings within a dataset, never across datasets or with MNIST's.",
        "",
    ]
    for name, r in results.items():
        sets = " ".join(f"-S {k}={v}" for k, v in r["params"].items())
        lines += [
            f"## {name}",
            "",
            f"`dvc exp run {sets}`, on {r['machine']}; n = {r['n']} samples per setting, real-vs-real floor FID "
            f"{r['floor_fid']:.1f}, real test images recognised {r['real_recognised']:.3f}, judge test accuracy "
            f"{r['judge_accuracy']:.4f}; training took {r['train_wall_s']['train-basic']:.0f} s (BasicUNet) and "
            f"{r['train_wall_s']['train-unet2d']:.0f} s (UNet2DModel).{' ' + r['note'] if r.get('note') else ''}",
            "",
            "| setting | FID [95%] | KID | recognised |",
            "|---|---|---|---|",
        ]
        for setting, m in sorted(r["settings"].items(), key=lambda kv: kv[1]["fid"]):
            lines.append(f"| {setting} | {_fmt(m, 'fid')} | {_fmt(m, 'kid')} | {m['recognised']:.3f} |")
        lines.append("")
    files.write_text(DOC, "\n".join(lines))
    print(f"wrote {DOC.relative_to(ROOT)}")


def main(argv: list[str] | None = None) -> None:
    parser = ScriptParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the datasets' experiments, then write the table")
    r.add_argument("--only", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    r.add_argument("--note", default="", help="said with these datasets' results (how they were measured)")
    sub.add_parser("table", help="ablations/own_images.json -> docs/own_images.md")
    args = parser.parse_args(argv)
    if args.command == "run":
        run(args.only, args.note)
    else:
        table()


if __name__ == "__main__":
    main()
