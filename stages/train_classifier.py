"""train-classifier: the small MNIST CNN whose features and verdicts the compare stage measures samples with.

    dvc repro train-classifier
    python stages/train_classifier.py

Reads params `classifier.*`, `mlflow.experiment` and data/dataset (training split for training, test
split for the accuracy). Writes models/classifier/model.safetensors and metrics/classifier.json (test accuracy).
"""

import torch
from safetensors.torch import save_file

from scratch_diffusion import files, tracking
from scratch_diffusion.config import flatten, load_params
from scratch_diffusion.data import load_split
from scratch_diffusion.metrics import accuracy, classifier_loss
from scratch_diffusion.models.classifier import MnistClassifier
from scratch_diffusion.stage import run_stage
from scratch_diffusion.training import fit, make_accelerator

OUT = "models/classifier/model.safetensors"


def main() -> None:
    params = load_params()
    c = params.classifier
    used = {"classifier": params.section("classifier")}
    images, labels = load_split("data/dataset", train=True)
    test_images, test_labels = load_split("data/dataset", train=False)

    accelerator = make_accelerator("fp32")
    torch.manual_seed(c.seed)
    model = MnistClassifier()
    with tracking.start_run(params.mlflow.experiment, "train-classifier", flatten(used), {}) as active:
        result = fit(
            model,
            classifier_loss,
            images,
            accelerator,
            labels=labels,
            batch_size=c.batch_size,
            lr=c.lr,
            epochs=c.epochs,
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
        files.write_json("metrics/classifier.json", metrics)
        files.write_json("models/classifier/run.json", {"run_id": active.info.run_id})
        print(f"train-classifier: test accuracy {acc:.4f}")


if __name__ == "__main__":
    run_stage(main)
