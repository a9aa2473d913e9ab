"""The Accelerate loop itself: EMA and lr schedule survive a crash and a resume, in process, bit for bit."""

import json
import math

import pytest
import torch
from accelerate import Accelerator

from scratch_diffusion.choices import MIXED_PRECISIONS
from scratch_diffusion.models import BasicUNet
from scratch_diffusion.objectives import toy_loss
from scratch_diffusion.training import EMA, Checkpointing, find_checkpoints, fit, make_accelerator


class Crash(Exception):
    pass


def _train(images, ckpt_dir, crash_at=None):
    torch.manual_seed(0)
    model = BasicUNet(1, 1, 28)
    ema = EMA(model, 0.9)

    def on_log(step, loss):
        if crash_at is not None and step >= crash_at:
            raise Crash

    fit(
        model,
        toy_loss,
        images,
        Accelerator(cpu=True),
        batch_size=16,
        lr=1e-3,
        epochs=2,
        seed=3,
        ema=ema,
        lr_schedule="cosine",
        warmup_steps=2,
        log_every=1,
        on_log=on_log,
        checkpointing=Checkpointing(ckpt_dir, every=3, identity=ID),
    )
    return model, ema


ID = {"params": {"basic.lr": 0.001}, "data": "d1", "code": {"objectives.py": "a", "training.py": "c"}}


def test_resume_restores_ema_and_lr_schedule(tmp_path):
    images = (torch.rand(96, 1, 28, 28) * 255).to(torch.uint8)  # 6 steps per epoch, 12 in all
    ref_model, ref_ema = _train(images, tmp_path / "ref")
    with pytest.raises(Crash):
        _train(images, tmp_path / "run", crash_at=8)  # last checkpoint: step 6
    model, ema = _train(images, tmp_path / "run")
    for a, b in [(ref_model, model), (ref_ema.model, ema.model)]:
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa)
    assert ema.updates == ref_ema.updates == 12


def test_checkpoints_of_another_process_count_are_not_resumed(tmp_path):
    images = (torch.rand(96, 1, 28, 28) * 255).to(torch.uint8)
    with pytest.raises(Crash):
        _train(images, tmp_path / "run", crash_at=8)
    one = Checkpointing(tmp_path / "run", every=3, identity=ID)
    assert one.num_processes == 1 and [p.name for p, _ in find_checkpoints(one)] == ["step-0000006", "step-0000003"]
    # The same checkpoints seen by a run of two processes (each has its own RNG state and data shard).
    two = Checkpointing(tmp_path / "run", every=3, identity=ID, num_processes=2)
    said = []
    assert find_checkpoints(two, log=said.append) == []
    assert said == [
        f"{tmp_path / 'run'}: 2 checkpoints of other inputs (made by 1 processes, this run has 2): "
        "starting fresh, cleared"
    ]


def test_checkpoints_of_other_inputs_are_not_resumed_and_say_what_changed(tmp_path):
    images = (torch.rand(96, 1, 28, 28) * 255).to(torch.uint8)
    with pytest.raises(Crash):
        _train(images, tmp_path / "run", crash_at=8)
    other = {"params": {"basic.lr": 0.001}, "data": "d1", "code": {"objectives.py": "b", "training.py": "c"}}
    said = []
    assert find_checkpoints(Checkpointing(tmp_path / "run", every=3, identity=other), log=said.append) == []
    assert said == [
        f"{tmp_path / 'run'}: 2 checkpoints of other inputs (objectives.py changed): starting fresh, cleared"
    ]
    # An unreadable completion marker is skipped with a line, never a crash.
    (tmp_path / "run/step-0000006/complete.json").write_text("{ not json")
    said = []
    found = find_checkpoints(Checkpointing(tmp_path / "run", every=3, identity=ID), log=said.append)
    assert [p.name for p, _ in found] == ["step-0000003"] and "unreadable complete.json" in said[0]


def test_a_run_resumed_from_its_final_checkpoint_reports_the_speed_of_the_run_that_made_it(tmp_path):
    images = (torch.rand(96, 1, 28, 28) * 255).to(torch.uint8)

    def train():
        torch.manual_seed(0)
        return fit(
            BasicUNet(1, 1, 28),
            toy_loss,
            images,
            Accelerator(cpu=True),
            batch_size=16,
            lr=1e-3,
            epochs=2,
            seed=3,
            checkpointing=Checkpointing(tmp_path / "run", every=3, identity=ID),
        )

    first = train()
    recorded = json.loads((tmp_path / "run/step-0000012/train_state.json").read_text())["progress"]["train_s"]
    again = train()  # finds step 12 complete: nothing left to train
    assert first.steps == again.steps == 12 and first.images_per_s > 0
    # The checkpoint holds the run's time up to step 12 (its own save excluded); the resumed run adds only its load.
    assert 0 < recorded <= first.wall_s and recorded <= again.wall_s
    assert again.images_per_s == pytest.approx(192 / again.wall_s)
    assert again.loss_curve == first.loss_curve


@pytest.mark.parametrize("warmup", [10, 4])
def test_ema_warmup_sets_the_mean_age_of_the_averaged_weights(warmup):
    # A weight that equals the step number: its average is the mean step that the EMA weighs, T - T / warmup.
    model = torch.nn.Linear(1, 1, bias=False)
    ema = EMA(model, decay=0.99999, warmup=warmup)
    steps = 1000
    for k in range(1, steps + 1):
        with torch.no_grad():
            model.weight.fill_(k)
        ema.update(model)
    assert ema.model.weight.item() == pytest.approx(steps - steps / warmup, rel=1e-3)


def test_ema_warmup_below_2_is_refused():
    with pytest.raises(ValueError, match="EMA warmup: got 1, allowed: >= 2"):
        EMA(torch.nn.Linear(1, 1), decay=0.995, warmup=1)


def test_the_budget_line_says_the_steps_and_the_time_the_timed_rate_gives():
    from scratch_diffusion.config import BasicParams
    from scratch_diffusion.hardware import Choice, detect
    from scratch_diffusion.training import budget_line, planned_steps

    section = BasicParams(batch_size=10, max_steps=0)
    capped = BasicParams(batch_size=10, max_steps=7)
    assert planned_steps(section, 3, 95) == 30 and planned_steps(capped, 3, 95) == 7
    assert budget_line("train-basic", capped, 3, 95).startswith(
        "train-basic: 7 steps (max_steps; 3 epochs of 95 images at batch 10 would be more)"
    )
    assert budget_line("train-basic", section, 3, 95) == (
        "train-basic: 30 steps (3 epochs of 95 images at batch 10); the time left is said after the first steps"
    )
    timed = Choice("fp32", False, detect("cpu"), chosen_by="timed", timings=(("fp32 NCHW", 5.0), ("fp32 NHWC", 3.0)))
    assert budget_line("train-basic", section, 3, 95, choice=timed).endswith("; about 60 s at the timed 5 img/s")


def test_one_process_trains_two_networks_in_different_precisions():
    """A benchmark or an ablation trains the BasicUNet and the UNet2DModel in one process, each in the precision
    `auto` chose for it; Accelerate keeps one precision per process and would refuse the second."""
    images = torch.rand(8, 1, 28, 28)
    for precision in ("fp32", "bf16", "fp32"):
        torch.manual_seed(0)
        accelerator = make_accelerator(precision)
        assert accelerator.mixed_precision == MIXED_PRECISIONS[precision]
        losses = []
        fit(
            BasicUNet(1, 1, 28),
            toy_loss,
            images,
            accelerator,
            batch_size=4,
            lr=1e-3,
            epochs=1,
            seed=0,
            log_every=1,
            on_log=lambda step, loss, seen=losses: seen.append(loss),
        )
        assert len(losses) == 2 and all(math.isfinite(x) for x in losses), (precision, losses)
