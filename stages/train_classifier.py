"""train-classifier: the small CNN of the dataset's classes whose features and verdicts the compare stage measures
samples with (models.classifier).

    dvc repro train-classifier
    python stages/train_classifier.py

Reads params `classifier.{seed,epochs,batch_size,lr,max_steps}`, `mlflow.experiment` and data/dataset (its shape
and classes, the training split for training and the input standardisation, the test split for the accuracy).
Writes models/classifier/model.safetensors, models/classifier/config.json (what rebuilds the classifier and the data
it was trained on: metrics.Judge.from_files refuses other data) and metrics/classifier.json (test accuracy).

An unlabelled dataset (no class folders) has nothing to train a classifier on: the stage writes config.json saying
there is no judge and why, metrics/classifier.json with test_accuracy null, and no weights and no MLflow run; compare
then reports memorisation and cost, and FID and KID on Inception-v3 features where `classifier.inception_weights` names
their weights file.
"""

from pathlib import Path

import _src  # noqa: F401 (first: this checkout's src/, see stages/_src.py)
import torch
from safetensors.torch import save_file

from scratch_diffusion import files, tracking
from scratch_diffusion.config import flatten, load_params, training_epochs
from scratch_diffusion.data import dataset_digest, describe, load_split
from scratch_diffusion.metrics import accuracy, classifier_loss
from scratch_diffusion.models.classifier import CONFIG, Classifier, channel_stats
from scratch_diffusion.stage import run_stage
from scratch_diffusion.training import budget_line, fit, make_accelerator

DATA = "data/dataset"
FOLDER = Path("models/classifier")
OUT = FOLDER / "model.safetensors"
NO_LABELS = (
    "the dataset is unlabelled (no class folders), so there is no classifier to train (put the images in one "
    "subfolder per class to have one)"
)


def main() -> None:
    params = load_params()
    c = params.classifier
    # What training reads (inception_weights is compare's, for unlabelled data: a change must not retrain this).
    used = {"classifier": {k: v for k, v in params.section("classifier").items() if k != "inception_weights"}}
    info = describe(DATA)
    # The data the classifier is for: Judge.from_files refuses it for any other.
    trained_on = {
        "dataset": info.name,
        "dataset_digest": dataset_digest(DATA),
        "channels": info.channels,
        "resolution": info.resolution,
        "num_classes": info.num_classes,
    }
    if not info.num_classes:
        for stale in (OUT, FOLDER / "run.json"):  # a previous labelled run's, when run outside DVC
            stale.unlink(missing_ok=True)
        files.write_json(FOLDER / CONFIG, {"judge": False, "reason": NO_LABELS, **trained_on})
        files.write_json("metrics/classifier.json", {"test_accuracy": None})
        measured = "memorisation and cost, but no FID, KID, recognised share or class coverage"
        if c.inception_weights:
            measured = (
                "FID and KID on Inception-v3 features (classifier.inception_weights), memorisation and cost, but no "
                "recognised share or class coverage"
            )
        print(f"train-classifier: no judge: {NO_LABELS}; compare will report {measured}")
        return
    images, labels = load_split(DATA, train=True)
    test_images, test_labels = load_split(DATA, train=False)
    mean, std = channel_stats(images)  # the whole training split's: on MNIST exactly 0.1307 and 0.3081

    epochs = training_epochs(c.epochs, info.name, len(images))
    print(budget_line("train-classifier", c, epochs, len(images)), flush=True)
    accelerator = make_accelerator("fp32")
    torch.manual_seed(c.seed)
    model = Classifier(info.channels, info.resolution, info.num_classes, mean, std)
    with tracking.start_run(params.mlflow.experiment, "train-classifier", flatten(used), {}) as active:
        result = fit(
            model,
            classifier_loss,
            images,
            accelerator,
            labels=labels,
            batch_size=c.batch_size,
            lr=c.lr,
            epochs=epochs,
            seed=c.seed,
            max_steps=c.max_steps,
            lr_schedule="cosine",
            on_log=lambda s, v: tracking.log_metrics({"loss": v}, step=s),
            desc="train-classifier",
        )
        net = accelerator.unwrap_model(model, keep_fp32_wrapper=False).cpu().eval()
        acc = accuracy(net, test_images, test_labels)
        metrics = {"test_accuracy": acc, "final_loss": result.final_loss, "wall_s": result.wall_s}
        tracking.log_metrics(metrics)
        with files.atomic_path(OUT) as tmp:
            save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp))
        files.write_json(FOLDER / CONFIG, {"judge": True, **trained_on, **net.config()})
        files.write_json("metrics/classifier.json", metrics)
        files.write_json(FOLDER / "run.json", {"run_id": active.info.run_id})
        print(f"train-classifier: test accuracy {acc:.4f} ({info.num_classes} classes)")


if __name__ == "__main__":
    run_stage(main)
