"""What every training stage reports at the end: MLflow metrics and a sample grid, DVC metrics and plots."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from scratch_diffusion import files, tracking
from scratch_diffusion.images import save_png
from scratch_diffusion.training import TrainResult


def report_training(result: TrainResult, picture: np.ndarray, metrics_path: str | Path, plots_dir: str | Path):
    """Log the final grid and metrics to the active MLflow run and write the DVC metrics and plots files."""
    tracking.log_image(picture, key="samples", step=result.steps)
    for epoch, loss in enumerate(result.epoch_losses, 1):
        tracking.log_metrics({"epoch_loss": loss}, step=epoch)
    metrics = {
        "final_loss": result.final_loss,
        "images_per_s": result.images_per_s,
        "wall_s": result.wall_s,
        "steps": result.steps,
    }
    tracking.log_metrics(metrics)
    files.write_json(metrics_path, {**metrics, "epoch_losses": result.epoch_losses})
    files.write_tsv(Path(plots_dir) / "loss.tsv", ["step", "loss"], result.loss_curve)
    save_png(Path(plots_dir) / "samples.png", picture)
    return metrics
