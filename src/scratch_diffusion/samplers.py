"""Samplers: from noise to images with a trained denoiser `model(x_t, t) -> prediction`."""

from __future__ import annotations

import torch


@torch.inference_mode()
def toy_sample(model, x: torch.Tensor, steps: int, record: bool = False):
    """The lesson's step sampler for x0-predicting toy models, in [0, 1].

    Start from uniform noise `x`; at step i move a fraction 1/(steps - i) of the way to the model's prediction:
    x <- x * (1 - 1/(steps - i)) + pred / (steps - i). The last step (i = steps-1) returns the prediction itself.
    With `record`, also returns each step's input and prediction (for the lesson's 5-step picture).
    """
    inputs, preds = [], []
    for i in range(steps):
        # The toy models ignore t; pass the noise amount the sampler assumes so conditioned models could use it.
        t = torch.full((x.shape[0],), 1 - i / steps, device=x.device)
        pred = model(x, t).float()
        if record:
            inputs.append(x.cpu())
            preds.append(pred.cpu())
        mix = 1 / (steps - i)
        x = x * (1 - mix) + pred * mix
    return (x, inputs, preds) if record else x
