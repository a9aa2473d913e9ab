"""train-classifier: the small CNN of the dataset's classes whose features and verdicts the compare stage measures
samples with (models.classifier).

    dvc repro train-classifier
    python stages/train_classifier.py

Trained by recipe.train_model, as the diffusion models are (its own identity, checkpoints in
checkpoints/train-classifier/, resume, MLflow run), in fp32 NCHW on every machine. Reads params
`classifier.{seed,epochs,batch_size,lr,max_steps,log_every,checkpoint_every,checkpoints_keep}`, `mlflow.experiment`
and data/dataset (its shape and classes, the training split for training and the input standardisation, the test
split for the accuracy).
Writes models/classifier/model.safetensors, models/classifier/config.json (what rebuilds the classifier and the data
it was trained on: metrics.Judge.from_files refuses other data) and metrics/classifier.json (test accuracy).

An unlabelled dataset (no class folders) has nothing to train a classifier on: the stage writes config.json saying
there is no judge and why, metrics/classifier.json with test_accuracy null, and no weights and no MLflow run; compare
then reports memorisation and cost, and FID and KID on Inception-v3 features where `classifier.inception_weights` names
their weights file.
"""

from pathlib import Path

import _src  # noqa: F401 (first: this checkout's src/, see stages/_src.py)

from scratch_diffusion import files
from scratch_diffusion.config import load_params
from scratch_diffusion.data import describe, load_split
from scratch_diffusion.metrics import accuracy
from scratch_diffusion.models.classifier import CONFIG
from scratch_diffusion.recipe import judged_data, train_model
from scratch_diffusion.stage import run_stage

DATA = "data/dataset"
FOLDER = Path("models/classifier")
NO_LABELS = (
    "the dataset is unlabelled (no class folders), so there is no classifier to train (put the images in one "
    "subfolder per class to have one)"
)


def main() -> None:
    params = load_params()
    info = describe(DATA)
    if not info.num_classes:
        for stale in (FOLDER / "model.safetensors", FOLDER / "run.json"):  # a labelled run's, when run outside DVC
            stale.unlink(missing_ok=True)
        files.write_json(FOLDER / CONFIG, {"judge": False, "reason": NO_LABELS, **judged_data(info, DATA)})
        files.write_json("metrics/classifier.json", {"test_accuracy": None})
        measured = "memorisation and cost, but no FID, KID, recognised share or class coverage"
        if params.classifier.inception_weights:
            measured = (
                "FID and KID on Inception-v3 features (classifier.inception_weights), memorisation and cost, but no "
                "recognised share or class coverage"
            )
        print(f"train-classifier: no judge: {NO_LABELS}; compare will report {measured}")
        return
    test_images, test_labels = load_split(DATA, train=False)
    trained = train_model(
        "classifier",
        params,
        stage="train-classifier",
        out=FOLDER,
        evaluate=lambda net: {"test_accuracy": accuracy(net.cpu(), test_images, test_labels)},
    )
    if trained.metrics:  # the main process's (with several, the others measure nothing)
        acc = trained.metrics["test_accuracy"]
        result = trained.result
        files.write_json(
            "metrics/classifier.json", {"test_accuracy": acc, "final_loss": result.final_loss, "wall_s": result.wall_s}
        )
        print(f"train-classifier: test accuracy {acc:.4f} ({info.num_classes} classes)")


if __name__ == "__main__":
    run_stage(main)
