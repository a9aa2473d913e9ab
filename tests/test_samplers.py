import torch

from scratch_diffusion.samplers import toy_sample


def test_toy_sampler_ends_at_an_oracle_prediction():
    """A denoiser that always predicts the same x0 makes the lesson's sampler land exactly on it."""
    target = torch.rand(3, 1, 28, 28)
    x = torch.rand(3, 1, 28, 28)
    out = toy_sample(lambda x_t, t: target, x, steps=5)
    torch.testing.assert_close(out, target)


def test_toy_sampler_records_each_step():
    calls = []

    def model(x_t, t):
        calls.append(t.clone())
        return torch.zeros_like(x_t)

    x = torch.ones(2, 1, 28, 28)
    out, inputs, preds = toy_sample(model, x, steps=4, record=True)
    assert len(inputs) == len(preds) == 4 and len(calls) == 4
    # Each step moves 1/(n-i) of the way to the prediction (zeros): 1 -> 3/4 -> 2/4 -> 1/4 -> 0.
    assert [float(i[0, 0, 0, 0]) for i in inputs] == [1.0, 0.75, 0.5, 0.25]
    assert float(out.abs().max()) == 0.0
    assert [round(float(t[0]), 2) for t in calls] == [1.0, 0.75, 0.5, 0.25]
