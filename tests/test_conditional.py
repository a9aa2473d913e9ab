"""Class-conditional UNet2DModel with classifier-free guidance: the label path, guidance, label dropout, and a tiny
trained model that draws the digit it is asked for more often than chance."""

import pytest
import torch
import yaml
from diffusers import DDPMScheduler

from scratch_diffusion.choices import PREDICTION_TYPES
from scratch_diffusion.config import ParamsError, params_from_dict
from scratch_diffusion.corruption import ddpm_scheduler
from scratch_diffusion.data import load_split
from scratch_diffusion.metrics import accuracy, predict_proba
from scratch_diffusion.models import Guided, UNet2DDenoiser, build_unet
from scratch_diffusion.models.classifier import Classifier, channel_stats
from scratch_diffusion.objectives import classifier_loss, ddpm_loss, per_image, target
from scratch_diffusion.recipe import train_model
from scratch_diffusion.samplers import generate
from scratch_diffusion.training import fit, make_accelerator
from tests.conftest import REPO, TINY, merge

# TINY's blocks with 64 channels in the second: with 32 channels in 32 GroupNorm groups, the per-channel shift that
# the time (and class) embedding adds is normalised away entirely, so a (32, 32) net ignores its labels.
SMALL = {
    **{k: TINY["unet2d"][k] for k in ("layers_per_block", "down_block_types", "up_block_types")},
    "block_out_channels": [32, 64],
}


def denoiser(num_classes: int = 10) -> UNet2DDenoiser:
    torch.manual_seed(0)
    return UNet2DDenoiser(build_unet(**SMALL, sample_size=28, channels=1, num_classes=num_classes)).eval()


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(6, 1, 28, 28, generator=g), torch.randint(0, 1000, (6,), generator=g)


@torch.no_grad()
def test_the_label_changes_the_prediction(inputs):
    x, t = inputs
    net = denoiser()
    assert net.null_label == 10 and net.unet.config.num_class_embeds == 11
    threes, fives = net(x, t, torch.full((6,), 3)), net(x, t, torch.full((6,), 5))
    assert not torch.allclose(threes, fives, atol=1e-4)
    # No label is the null token.
    assert torch.equal(net(x, t), net(x, t, torch.full((6,), 10)))


@torch.no_grad()
def test_guidance_scales(inputs):
    x, t = inputs
    net = denoiser()
    y = torch.tensor([0, 1, 2, 7, 8, 9])
    cond, uncond = net(x, t, y), net(x, t, torch.full((6,), 10))
    assert torch.equal(Guided(net, y, 1.0)(x, t), cond)  # scale 1: exactly the plain conditional call
    assert torch.equal(Guided(net, y, 0.0)(x, t), uncond)  # scale 0: the unconditional one
    guided = Guided(net, y, 3.0)(x, t)  # one forward call of a double batch
    torch.testing.assert_close(guided, uncond + 3 * (cond - uncond), atol=1e-4, rtol=1e-4)


def test_labels_need_a_class_conditional_model(inputs):
    x, t = inputs
    plain = denoiser(num_classes=0)
    with pytest.raises(ValueError, match="not trained class-conditional"):
        plain(x, t, torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match="class-conditional model"):
        Guided(plain, torch.zeros(6, dtype=torch.long), 2.0)


class Recorder(torch.nn.Module):
    """A real denoiser that remembers the labels it was called with."""

    def __init__(self, net):
        super().__init__()
        self.net, self.seen = net, []

    def forward(self, x_t, t, y=None):
        self.seen.append(y)
        return self.net(x_t, t, y)


def test_label_dropout_rate_is_honoured():
    net = Recorder(denoiser())
    loss_fn = ddpm_loss(ddpm_scheduler(prediction_type="sample"), "x0", label_dropout=0.3, null_label=10)
    torch.manual_seed(0)
    x = torch.rand(128, 1, 8, 8)  # small images: only the labels matter here
    y = torch.full((128,), 4)
    with torch.no_grad():
        for _ in range(24):
            loss_fn(net, x, y)
    seen = torch.cat(net.seen)
    assert set(seen.tolist()) == {4, 10}
    dropped = (seen == 10).float().mean().item()
    assert abs(dropped - 0.3) < 0.04, dropped  # 3072 draws: 4 standard deviations


class TwoDigitOracle(torch.nn.Module):
    """The exact denoiser of a known data set, for any objective: class 0 is N(A, s^2 I), class 1 is N(B, s^2 I), two
    28x28 bar images in [-1, 1]. Conditional on a label it returns the posterior mean of x0 under that class; without
    (the null label 2) under the equal mixture. Guided sampling from it must land nearer A when asked for class 0."""

    null_label = 2
    s = 0.5
    image_shape = (1, 28, 28)  # what samplers.generate draws for it

    def __init__(self, scheduler):
        super().__init__()
        self.alphas_cumprod = scheduler.alphas_cumprod.float()
        self.objective = {v: k for k, v in PREDICTION_TYPES.items()}[scheduler.config.prediction_type]
        a, b = -torch.ones(1, 28, 28), -torch.ones(1, 28, 28)
        a[:, 4:24, 12:16] = 1  # a "1"
        b[:, 4:8, 4:24] = b[:, 20:24, 4:24] = 1  # a "="
        self.means = torch.stack([a, b])

    def forward(self, x_t, t, y):
        ab = per_image(self.alphas_cumprod[t.round().long()], x_t)
        var = ab * self.s**2 + 1 - ab  # variance of x_t given the class, per pixel
        x0 = [m + ab.sqrt() * self.s**2 / var * (x_t - ab.sqrt() * m) for m in self.means]
        log_p = torch.stack([-((x_t - ab.sqrt() * m) ** 2 / var).flatten(1).sum(1) / 2 for m in self.means], 1)
        w = per_image(log_p.softmax(1)[:, 0], x_t)
        x0_hat = torch.where(
            per_image(y == 0, x_t), x0[0], torch.where(per_image(y == 1, x_t), x0[1], w * x0[0] + (1 - w) * x0[1])
        )
        eps = (x_t - ab.sqrt() * x0_hat) / (1 - ab).sqrt()
        return target(self.objective, x0_hat, eps, ab)


@pytest.mark.parametrize("objective", list(PREDICTION_TYPES))
@pytest.mark.parametrize(
    ("sampler", "steps"), [("ddpm", 50), ("ddim", 25), ("dpmsolver++", 10), ("euler", 20), ("heun", 10), ("unipc", 10)]
)
def test_guidance_draws_the_class_asked_for_with_every_sampler(tmp_path, objective, sampler, steps):
    """Guidance must never push samples away from the class asked for: with the oracle, samples asked for class 0 end
    nearer its mean at scale 3 than at scale 1 or not farther (DDIM's unclipped noise estimate pushed them toward the
    other class), and at scale 0 both classes appear."""
    ddpm_scheduler(beta_schedule="squaredcos_cap_v2", prediction_type=PREDICTION_TYPES[objective]).save_pretrained(
        tmp_path
    )
    trained = DDPMScheduler.from_pretrained(tmp_path)  # the saved config, as the sample stage reads it
    oracle = TwoDigitOracle(trained)
    a, b = oracle.means
    distance = {}
    for scale in (0, 1, 3):
        images, _ = generate(
            oracle,
            sampler,
            steps,
            32,
            batch_size=32,
            seed=0,
            corruption="ddpm",
            trained_config=trained.config,
            eta=1.0 if sampler == "ddim" else 0.0,
            labels=torch.zeros(32, dtype=torch.long),
            guidance_scale=scale,
        )
        x = torch.from_numpy(images).float().unsqueeze(1) / 127.5 - 1
        to_a, to_b = ((x - a) ** 2).mean((1, 2, 3)), ((x - b) ** 2).mean((1, 2, 3))
        distance[scale] = float(to_a.mean())
        asked = float((to_a < to_b).float().mean())
        assert asked == 1.0 if scale else 0.2 < asked < 0.8, (scale, asked)
    assert distance[3] <= distance[1] + 0.01, distance


def test_class_conditional_needs_ddpm_noise():
    with pytest.raises(ParamsError, match="unet2d.class_conditional: got true with unet2d.corruption=toy"):
        params_from_dict({"unet2d": {"class_conditional": True, "corruption": "toy", "conditioning": "amount"}})


@pytest.mark.slow
def test_a_tiny_conditional_model_draws_the_digit_asked_for(mnist_raw):
    """The stage's own training (recipe.train_model, in this process) on 3,000 real digits for 120 steps, then DDIM
    asked for each digit in turn: a classifier trained here on real digits recognises the digit asked for more often
    than chance, and more often with guidance than without. What the pipeline does with a class-conditional model
    (labels in the sample files, the report's columns, the guidance table, generate by class from the registry) is
    checked end to end through `dvc repro` in tests/test_own_images.py."""
    root = mnist_raw.parents[1]  # the dataset folder that the download stage writes
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    params = params_from_dict(
        merge(
            raw,
            {
                "data": {"n_train": 3000},
                "unet2d": {
                    "class_conditional": True,
                    # No attention blocks: a step costs about half, and 120 steps still learn the digits (guided
                    # accuracy about 0.4 where chance is 0.1).
                    "block_out_channels": [32, 64],
                    "layers_per_block": 1,
                    "down_block_types": ["DownBlock2D", "DownBlock2D"],
                    "up_block_types": ["UpBlock2D", "UpBlock2D"],
                    "max_steps": 120,
                    "batch_size": 32,
                    "lr": 2e-3,
                    "mixed_precision": "fp32",
                    "channels_last": False,
                },
            },
        )
    )
    trained = train_model("unet2d", params, data_root=root, desc="test")

    train_x, train_y = load_split(root, train=True, n=3000)
    test_x, test_y = load_split(root, train=False)
    torch.manual_seed(0)
    judge = Classifier(1, 28, 10, *channel_stats(train_x))
    fit(
        judge,
        classifier_loss,
        train_x,
        make_accelerator("fp32"),
        labels=train_y,
        batch_size=64,
        lr=2e-3,
        epochs=2,
        seed=0,
        max_steps=60,
        lr_schedule="cosine",
    )
    assert accuracy(judge, test_x[:2000], test_y[:2000]) > 0.9

    asked = torch.arange(100) % 10
    drawn = {}
    for scale in (0, 1, 3):
        images, nfe = generate(
            trained.model,
            "ddim",
            10,
            100,
            batch_size=100,
            seed=0,
            corruption="ddpm",
            trained_config=trained.scheduler.config,
            labels=asked,
            guidance_scale=scale,
        )
        assert images.shape == (100, 28, 28) and nfe == 10  # forward calls: a guided one evaluates a double batch
        drawn[scale] = float((predict_proba(judge, images).argmax(1) == asked).float().mean())
    assert drawn[3] > 0.25, drawn  # chance is 0.1
    assert drawn[3] > drawn[0], drawn  # guidance toward the label beats ignoring it
    assert drawn[3] >= drawn[1], drawn  # ... and never draws the digit asked for less often than no guidance
