"""compare: every sample set measured with the pipeline's classifier, in one report that names the best setting.

    dvc repro compare
    python stages/compare.py

Reads params `mlflow.experiment` and `classifier.{inception_weights,epochs,batch_size,max_steps}`; samples/ and
metrics/sample.json (sample), the training metrics and loss curves, models/*/ metadata, models/classifier and
data/dataset. Every number comes with its 95% interval (metrics.Judge) and each setting with its verdict against the
best (better / within noise / worse).
Writes reports/compare.md, reports/compare.html (images inline), reports/figures/*.png, metrics/compare.json
(headline FID and KID with intervals, for `dvc exp show` / `dvc metrics diff`) and plots/compare/fid_vs_nfe.tsv (for
`dvc plots diff`). Logs an MLflow run named `compare`, and records the best UNet2DModel FID on its registered version,
with the judge that measured it, moving the alias `champion` only among versions measured by that judge
(tracking.promote_champion).

An unlabelled dataset has no classifier (models/classifier/config.json says so): compare then reports memorisation
(pixel distances need no classifier), cost and the pictures; recognised and coverage are null in metrics/compare.json
and n/a in the report, one line says why, and no champion is promoted (a champion needs a classifier judge of known
accuracy). FID and KID (with their floor and intervals) are measured on Inception-v3 features where
`classifier.inception_weights` names the weights file (metrics/compare.json's `fid_features` says so), else they are
null and n/a too.
"""

import hashlib
import json
from pathlib import Path

import _src  # noqa: F401 (first: this checkout's src/, see stages/_src.py)
import numpy as np

from scratch_diffusion import files, tracking
from scratch_diffusion.compare_report import (
    best_conditional,
    plot_class_grid,
    plot_fid_vs_nfe,
    plot_guidance,
    plot_losses,
    plot_montage,
    settings_metrics,
    summarise,
    weak_judge,
    write_report,
)
from scratch_diffusion.config import ClassifierParams, SampleParams, images_seen, load_params
from scratch_diffusion.data import dataset_digest, describe, load_split
from scratch_diffusion.metrics import Judge
from scratch_diffusion.stage import StageError, run_stage

REPORTS = Path("reports")
# What each model was trained with; the UNet2DModel's comes from its saved metadata.
BASIC_META = {"corruption": "toy", "objective": "x0", "conditioning": "none"}


def _read_json(path: str | Path, stage: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise StageError(f"{path}: missing; run `dvc repro {stage}` first")
    return json.loads(path.read_text())


def _loss_curve(path: str) -> list[tuple[int, float]]:
    rows = Path(path).read_text().split("\n")[1:]
    return [(int(s), float(v)) for s, v in (r.split("\t") for r in rows if r)]


def main() -> None:
    params = load_params()
    tracking.check_experiment(params.mlflow.experiment)  # a deleted experiment stops here, not after the measuring
    timings = _read_json("metrics/sample.json", "sample")
    sizes = {t["n"] for t in timings.values()}
    if len(sizes) != 1:
        raise StageError(
            f"metrics/sample.json: sample sets of different sizes {sorted(sizes)}; rerun `dvc repro sample`"
        )
    n = sizes.pop()
    classifier_file = Path("models/classifier/model.safetensors")
    classifier_accuracy = _read_json("metrics/classifier.json", "train-classifier")["test_accuracy"]  # None: none
    test_images, test_labels = load_split("data/dataset", train=False)
    data = describe("data/dataset")  # its class names (the report's) and split sizes (the champion's scale)
    classes = data.classes
    if 2 * n > len(test_images):
        raise StageError(
            f"sample.n: got {n}; compare needs 2 * n real test images (allowed: n <= {len(test_images) // 2})"
        )
    # Refuses a classifier trained on other data; without a classifier, Inception's features where params name them.
    judge = Judge.from_files(classifier_file, "data/dataset", n, inception_weights=params.classifier.inception_weights)
    judged = judge.classifier is not None  # recognised, coverage, a champion
    floor = judge.floor
    ranked = floor is not None  # FID and KID measured: on the classifier's features or Inception's
    fid_features = None  # what FID is measured on, where that is not the classifier (the report and compare.json say)
    if judge.inception is not None:
        fid_features = f"Inception-v3 pool features (2048), weights {judge.inception.weights.name} sha256 "
        fid_features += judge.inception.digest
        print(
            f"compare: FID and KID on {fid_features}; recognised and coverage not measured: {judge.no_classifier}",
            flush=True,
        )
    elif not judged:
        print(
            f"compare: FID, KID, recognised and coverage not measured: {judge.no_classifier}; for an Inception FID, "
            "set classifier.inception_weights to the FID Inception-v3 weights file",
            flush=True,
        )

    metas = {"basic": BASIC_META}
    if any(name.startswith("unet2d/") for name in timings):
        metas["unet2d"] = _read_json("models/unet2d/scratch_diffusion.json", "train-unet2d")
    # Class-conditional sets are judged per class against real test images outside the reference and floor sets.
    spare_images, spare_labels = test_images[2 * n :], test_labels[2 * n :].numpy()
    rows, images, labels, replicates = [], {}, {}, {}
    for name, t in sorted(timings.items()):
        model, rest = name.split("/", 1)
        sampler, steps = rest.split("-")[0], int(rest.split("-")[1])
        with np.load(f"samples/{name}.npz") as npz:
            images[name] = npz["images"]
            if "labels" in npz:
                labels[name] = npz["labels"]
        quality = judge.measure(images[name])
        replicates[name] = quality.pop("replicates")
        if name in labels:
            per_class = judge.conditional(images[name], labels[name], spare_images, spare_labels, classes)
            replicates[name] |= per_class.pop("replicates")
            quality |= per_class | {"guidance_scale": t["guidance_scale"]}
        meta = metas[model]
        rows.append(
            {
                "setting": name,
                "model": model,
                "sampler": sampler,
                "steps": steps,
                "nfe": t["nfe"],
                "seconds_per_image": t["seconds_per_image"],
                **quality,
                **{k: meta[k] for k in ("corruption", "objective", "conditioning")},
            }
        )
        shown = f", conditional accuracy {quality['cond_accuracy']:.3f}" if name in labels else ""
        if judged:
            measured = (
                f"FID {quality['fid']:.2f} [{quality['fid_lo']:.2f}, {quality['fid_hi']:.2f}], "
                f"KID {quality['kid']:.3g}, recognised {quality['recognised']:.3f}{shown}"
            )
        elif ranked:
            measured = (
                f"Inception FID {quality['fid']:.2f} [{quality['fid_lo']:.2f}, {quality['fid_hi']:.2f}], "
                f"KID {quality['kid']:.3g}, memorised {quality['memorised']:.3f}"
            )
        else:
            measured = f"memorised {quality['memorised']:.3f}, {t['seconds_per_image'] * 1000:.1f} ms per image"
        print(f"compare: {name}: {measured}", flush=True)
    if ranked:
        rows.sort(key=lambda r: (r["model"], r["fid"]))  # else in setting order: nothing to rank them by
    summary = summarise(rows, replicates, floor)

    figures = {
        "FID against NFE": REPORTS / "figures/fid_vs_nfe.png",
        "Training loss": REPORTS / "figures/loss_curves.png",
        "Samples, in table order": REPORTS / "figures/montage.png",
    }
    if ranked:
        plot_fid_vs_nfe(rows, floor, figures["FID against NFE"], "Inception" if fid_features else "classifier")
    else:
        del figures["FID against NFE"]
    curves = {}
    for name in ("basic", "unet2d"):
        if name in metas and Path(f"plots/train_{name}/loss.tsv").is_file():
            curves[name] = _loss_curve(f"plots/train_{name}/loss.tsv")
    plot_losses(curves, figures["Training loss"])
    plot_montage(rows, images, figures["Samples, in table order"])
    conditional_rows = [r for r in rows if r.get("cond_accuracy") is not None]
    best_cond = best_conditional(rows)
    if best_cond is not None:
        figures["Conditional accuracy and FID against guidance scale"] = REPORTS / "figures/guidance.png"
        figures["Ten of each class"] = REPORTS / "figures/classes.png"
        plot_guidance(
            conditional_rows,
            figures["Conditional accuracy and FID against guidance scale"],
            chance=1 / judge.classifier.num_classes,
        )
        plot_class_grid(
            images[best_cond["setting"]],
            labels[best_cond["setting"]],
            figures["Ten of each class"],
            [classes[c] for c in sorted(set(labels[best_cond["setting"]].tolist()))],
            f"{best_cond['setting']}: one row per class asked for "
            f"(conditional accuracy {best_cond['cond_accuracy']:.3f})",
        )
    context = {
        "n": n,
        "classifier_accuracy": classifier_accuracy,
        "num_classes": judge.classifier.num_classes if judged else 0,
        "real_recognised": judge.real_recognised,
        "no_classifier": judge.no_classifier,
        "fid_features": fid_features,
        "weak_judge": weak_judge(classifier_accuracy if judged else None, tracking.MIN_JUDGE_ACCURACY),
    }
    write_report(rows, summary, context, figures, REPORTS / "compare.md", REPORTS / "compare.html")

    headline = {"real_floor_fid": floor, "real_recognised": judge.real_recognised, "n": n}
    if fid_features:
        headline["fid_features"] = fid_features  # not the classifier's scale: these FIDs compare with no others
    for model in sorted({r["model"] for r in rows}):
        # Without FID there is nothing to pick the best by: the headline's numbers are null.
        best = min((r for r in rows if r["model"] == model), key=lambda r: r["fid"]) if ranked else {}
        for key in ("fid", "fid_lo", "fid_hi", "kid", "kid_lo", "kid_hi", "recognised"):
            headline[f"best_{key}_{model}"] = best.get(key)
    if conditional_rows:
        headline["best_cond_accuracy_unet2d"] = best_cond["cond_accuracy"]
    files.write_json("metrics/compare.json", {**headline, "settings": settings_metrics(rows)})
    fid_columns = ["setting", "sampler", "nfe", "fid", "fid_lo", "fid_hi"]
    # Header only without FID, so that the DVC plot exists in every experiment.
    fid_rows = [[r[k] for k in fid_columns] for r in rows if ranked]
    files.write_tsv("plots/compare/fid_vs_nfe.tsv", fid_columns, fid_rows)
    # Always written (header only without class-conditional sets), so the DVC plot exists in every experiment.
    files.write_tsv(
        "plots/compare/guidance.tsv",
        ["setting", "sampler", "guidance", "cond_accuracy", "fid"],
        [
            (r["setting"], f"{r['sampler']}-{r['steps']}", r["guidance_scale"], r["cond_accuracy"], r["fid"])
            for r in conditional_rows
        ],
    )

    tags = {"best_setting": summary["best"]["setting"]} if ranked else {}
    if fid_features:
        tags["fid_features"] = fid_features
    for name in ("basic", "unet2d", "classifier"):
        run_file = Path(f"models/{name}/run.json")
        if run_file.is_file():
            tags[f"train_run_{name}"] = json.loads(run_file.read_text())["run_id"]
    if Path("samples/run.json").is_file():
        tags["sample_run"] = json.loads(Path("samples/run.json").read_text())["run_id"]
    with tracking.start_run(params.mlflow.experiment, "compare", {"n": n}, tags):
        registered = _read_json("models/unet2d/run.json", "train-unet2d") if "unet2d" in metas else {}
        if registered.get("registered_version") and not judged:
            # A champion is ranked by a classifier judge whose test accuracy bounds it (tracking.promote_champion);
            # Inception features have no accuracy on this data to bound: their FIDs stay in the report, rank nothing.
            why = "Inception FIDs are no classifier judge" if ranked else "there is no judge to rank versions by FID"
            print(f"compare: no champion promoted: {why} ({judge.no_classifier})", flush=True)
        elif registered.get("registered_version"):
            name, version = registered["registered_model"], registered["registered_version"]
            # The scale its FIDs are on: FIDs by another classifier, other reference images or another n never compare.
            judge_id = {
                "classifier": hashlib.sha256(classifier_file.read_bytes()).hexdigest()[:16],
                "reference": dataset_digest("data/dataset"),  # the reference set: the first n test images of this data
                "n": n,
            }
            interval = (headline["best_fid_lo_unet2d"], headline["best_fid_hi_unet2d"])
            # tracking.SCALE_RULE: this measurement's scale against the one params.yaml's defaults give on this data.
            judge_images = images_seen(params.classifier, data.name, data.n_train)
            default_scale = (SampleParams().size(data.n_test), images_seen(ClassifierParams(), data.name, data.n_train))
            said = tracking.promote_champion(
                name,
                version,
                headline["best_fid_unet2d"],
                interval,
                judge_id,
                classifier_accuracy,
                judge_images=judge_images,
                default_scale=default_scale,
                run_id=registered.get("run_id"),
            )
            print(f"compare: {said}", flush=True)
        tracking.log_metrics({k: v for k, v in headline.items() if k not in ("n", "fid_features") and v is not None})
        # The accuracy/FID trade-off, one step per guidance scale x 10 (MLflow steps are ints).
        for r in conditional_rows:
            key = f"{r['sampler']}-{r['steps']}".replace("+", "p")
            step = round(10 * r["guidance_scale"])
            tracking.log_metrics({f"{key}.cond_accuracy": r["cond_accuracy"], f"{key}.fid": r["fid"]}, step=step)
        tracking.log_artifact(REPORTS / "compare.md", "report")
    if context["weak_judge"]:  # said last, where a user reads first
        print(f"compare: {context['weak_judge']}", flush=True)
        tracking.log_artifact(REPORTS / "compare.html", "report")
        for fig in figures.values():
            tracking.log_artifact(fig, "report/figures")


if __name__ == "__main__":
    run_stage(main)
