"""`auto` chosen by timing (tuning.py): the choice logic on given timings, the cache and its key, what is never
timed, and one real timing of a tiny network's training step and evaluation on this machine."""

import json
import math
import time

import pytest
import torch

from scratch_diffusion import tuning
from scratch_diffusion.hardware import Hardware, choose, detect
from scratch_diffusion.models import BasicUNet
from scratch_diffusion.objectives import toy_loss
from scratch_diffusion.samplers import evaluation_step, sampling_choice
from scratch_diffusion.training import timing_step
from scratch_diffusion.tuning import Candidate, Timing, TuningError

AVX2 = Hardware("cpu", frozenset({"avx2"}))
BF16 = Hardware("cpu", frozenset({"avx2", "avx512f", "avx512_bf16"}))
GPU = Hardware("cuda", frozenset(), cuda_bf16=True)
FP32_NCHW, FP32_NHWC = Candidate("fp32", False), Candidate("fp32", True)
BF16_NCHW, BF16_NHWC = Candidate("bf16", False), Candidate("bf16", True)
KEY = {"device": "cpu: test", "threads": 2, "processes": 1, "torch": "2.x", "network": "n", "architecture": "a"}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(tuning.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(tuning, "CANDIDATE_S", 0.05)  # keep the timed part of each candidate short
    # Sleeping steps on a machine the other test worker keeps busy: what distrusts a timing is tested on its own.
    monkeypatch.setattr(tuning, "cpu_use", lambda: None)
    monkeypatch.setattr(tuning, "NOISY_SPREAD", math.inf)
    return tmp_path / "tuning.json"


def sleeper(seconds: dict, losses: dict | None = None, calls: list | None = None):
    """A run_step whose candidates take the given seconds per step (and give the given losses, default 1)."""

    def setup(candidate):
        if calls is not None:
            calls.append(candidate)

        def step():
            time.sleep(seconds[candidate])
            return (losses or {}).get(candidate, 1.0)

        return step

    return setup


def test_the_fastest_finite_timing_is_picked():
    timings = [Timing(FP32_NCHW, 35.0), Timing(FP32_NHWC, 42.0), Timing(BF16_NCHW, 40.0)]
    assert tuning.pick(timings).candidate == FP32_NHWC
    # A candidate whose loss was not finite never wins, however fast it ran.
    assert tuning.pick([*timings, Timing(BF16_NHWC, 900.0, finite=False)]).candidate == FP32_NHWC
    assert tuning.pick([Timing(FP32_NCHW, math.nan), Timing(FP32_NHWC, 1.0)]).candidate == FP32_NHWC
    assert tuning.pick([Timing(FP32_NHWC, 5.0), Timing(FP32_NCHW, 5.0)]).candidate == FP32_NHWC  # a tie: the first
    with pytest.raises(TuningError, match=r"no candidate kept a finite loss \(tried: fp32 NCHW, bf16 NCHW\)"):
        tuning.pick([Timing(FP32_NCHW, 3.0, finite=False), Timing(BF16_NCHW, math.nan, finite=False)])


@pytest.mark.parametrize(
    ("hardware", "training", "want"),
    [
        (AVX2, True, ["fp32 NCHW", "fp32 NHWC"]),  # emulated bf16 is never a candidate
        (BF16, True, ["fp32 NCHW", "fp32 NHWC", "bf16 NCHW", "bf16 NHWC"]),
        (GPU, True, ["fp32 NCHW", "fp32 NHWC", "bf16 NCHW", "bf16 NHWC", "fp16 NCHW", "fp16 NHWC"]),
        (GPU, False, ["fp32 NCHW", "fp32 NHWC", "bf16 NCHW", "bf16 NHWC"]),  # sampling: fp32 or bf16
    ],
)
def test_the_candidates_are_what_the_hardware_runs_natively(hardware, training, want):
    assert [c.label for c in tuning.candidates(hardware, "auto", "auto", training=training)] == want


def test_an_explicit_value_fixes_its_part():
    assert [c.label for c in tuning.candidates(BF16, "fp32", "auto", training=True)] == ["fp32 NCHW", "fp32 NHWC"]
    assert [c.label for c in tuning.candidates(BF16, "auto", True, training=True)] == ["fp32 NHWC", "bf16 NHWC"]
    assert [c.label for c in tuning.candidates(AVX2, "bf16", False, training=True)] == ["bf16 NCHW"]


def resolve(precision="auto", channels_last="auto", *, hardware=AVX2, steps=10_000, key=KEY, batch=8, run_step):
    rule = choose("unet2d", precision, channels_last, hardware)
    return tuning.resolve(
        rule, precision, channels_last, training=True, steps=steps, batch=batch, key=key, run_step=run_step
    )


def test_auto_times_picks_the_fastest_and_caches_it(cache, capsys):
    calls = []
    slow_fast = sleeper({FP32_NCHW: 0.02, FP32_NHWC: 0.002}, calls=calls)
    choice = resolve(run_step=slow_fast)
    assert (choice.precision, choice.channels_last, choice.chosen_by) == ("fp32", True, "timed")
    assert [label for label, _ in choice.timings] == ["fp32 NCHW", "fp32 NHWC"]
    rates = dict(choice.timings)
    assert rates["fp32 NHWC"] > 3 * rates["fp32 NCHW"] > 0
    assert calls == [FP32_NCHW, FP32_NHWC]
    entry = next(iter(json.loads(cache.read_text()).values()))
    assert entry["chose"] == ["fp32", True] and entry["parts"]["batch"] == 8

    # The same key again: read from the cache, nothing timed, the same rates said.
    again = resolve(run_step=sleeper({}, calls=calls))
    assert (again.channels_last, again.chosen_by, again.timings) == (True, "cached", choice.timings)
    assert calls == [FP32_NCHW, FP32_NHWC]
    assert "chose fp32 NHWC (cached)" in again.line("train-unet2d", 2)


@pytest.mark.parametrize(
    "change",
    [
        {"key": {**KEY, "device": "cpu: another model"}},
        {"key": {**KEY, "threads": 8}},
        {"key": {**KEY, "processes": 2}},
        {"key": {**KEY, "torch": "3.0"}},
        {"key": {**KEY, "architecture": "b"}},
        {"batch": 16},
        {"hardware": AVX2},  # other candidates: no bf16
        {"precision": "fp32"},  # the layouts only: its own entry
    ],
    ids=["cpu", "threads", "processes", "torch", "network", "batch", "candidates", "explicit-part"],
)
def test_each_part_of_the_key_invalidates_the_cache(cache, change):
    seconds = {c: 0.001 for c in (FP32_NCHW, FP32_NHWC, BF16_NCHW, BF16_NHWC)}
    assert resolve(hardware=BF16, run_step=sleeper(seconds)).chosen_by == "timed"
    assert resolve(hardware=BF16, run_step=sleeper(seconds)).chosen_by == "cached"
    calls = []
    change = {"hardware": BF16, **change}
    assert resolve(**change, run_step=sleeper(seconds, calls=calls)).chosen_by == "timed"
    assert calls


def test_explicit_values_and_short_runs_are_not_timed(cache):
    def never(candidate):
        raise AssertionError(f"timed {candidate}")

    explicit = resolve("fp32", False, run_step=never)
    assert (explicit.precision, explicit.channels_last, explicit.chosen_by) == ("fp32", False, "params")
    assert "as params say" in explicit.line("s", 1)
    short = resolve(steps=100, run_step=never)  # 2 candidates x 4 steps > 5% of 100 steps
    assert (short.precision, short.channels_last, short.chosen_by) == ("fp32", False, "rule")
    assert "not timed: 100 steps are too few to pay for timing" in short.line("s", 1)
    assert not cache.exists()
    # The rule's warning (emulated bf16 asked for) stays with what the params fix.
    emulated = resolve("bf16", "auto", run_step=sleeper({BF16_NCHW: 0.001, BF16_NHWC: 0.001}))
    assert emulated.precision == "bf16" and "emulates" in emulated.warning and emulated.chosen_by == "timed"


def test_a_candidate_whose_loss_is_not_finite_is_refused(cache):
    seconds = {FP32_NCHW: 0.02, FP32_NHWC: 0.001}
    choice = resolve(run_step=sleeper(seconds, losses={FP32_NHWC: math.nan}))
    assert (choice.channels_last, choice.chosen_by) == (False, "timed")
    assert math.isnan(dict(choice.timings)["fp32 NHWC"])
    assert "fp32 NHWC (loss not finite)" in choice.line("s", 1)
    with pytest.raises(TuningError, match="no candidate kept a finite loss"):
        resolve(key={**KEY, "network": "other"}, run_step=sleeper(seconds, losses=dict.fromkeys(seconds, math.inf)))


def test_a_candidate_that_does_not_run_is_not_chosen(cache, capsys):
    def setup(candidate):
        if candidate.channels_last:
            raise RuntimeError("no NHWC kernel for this op")
        return sleeper({FP32_NCHW: 0.001})(candidate)

    choice = resolve(run_step=setup)
    assert (choice.channels_last, choice.chosen_by) == (False, "timed")
    assert "fp32 NHWC does not run here (no NHWC kernel for this op); not a candidate" in capsys.readouterr().err


def test_an_unreadable_cache_is_timed_again_and_rewritten(cache, capsys):
    cache.write_text('{"half": ')
    choice = resolve(run_step=sleeper({FP32_NCHW: 0.001, FP32_NHWC: 0.001}))
    assert choice.chosen_by == "timed"
    assert "unreadable" in capsys.readouterr().err
    assert len(json.loads(cache.read_text())) == 1
    # An entry of another shape under the same key is timed again, not trusted.
    entries = json.loads(cache.read_text())
    for entry in entries.values():
        entry["timings"] = "garbage"
    cache.write_text(json.dumps(entries))
    assert resolve(run_step=sleeper({FP32_NCHW: 0.001, FP32_NHWC: 0.001})).chosen_by == "timed"


def test_timing_a_training_step_changes_nothing_the_run_depends_on(cache):
    """The real timing on this machine, with a tiny BasicUNet: the model and the global RNG are as before, so a seed
    gives the same weights whether `auto` timed or the params named the choice."""
    torch.manual_seed(0)
    model = BasicUNet(1, 1, 16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randint(0, 256, (8, 1, 16, 16), dtype=torch.uint8)
    rng = torch.get_rng_state()
    hardware = detect("cpu")
    rule = choose("basic", "auto", "auto", hardware)
    key = {**tuning.machine_key("cpu"), "network": "basic", "architecture": tuning.network_key(model)}
    run_step = timing_step(model, toy_loss, images, None, lr=1e-3, device=torch.device("cpu"))
    choice = tuning.resolve(rule, "auto", "auto", training=True, steps=10**6, batch=8, key=key, run_step=run_step)
    options = tuning.candidates(hardware, "auto", "auto", training=True)
    assert choice.chosen_by == "timed" and [label for label, _ in choice.timings] == [c.label for c in options]
    assert all(rate > 0 for _, rate in choice.timings)
    assert Candidate(choice.precision, choice.channels_last) in options
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.down_layers[0].weight.is_contiguous()  # the layout of the model given is untouched


def test_sampling_times_each_model_evaluation(cache):
    torch.manual_seed(0)
    model = BasicUNet(3, 3, 8).eval()
    step = evaluation_step(model, 4, "cpu")(Candidate("fp32", True))
    assert math.isfinite(step())
    short = sampling_choice(model, "auto", "auto", "cpu", batch=4, evaluations=10)
    assert (short.channels_last, short.chosen_by) == (False, "rule")
    assert "not timed: 10 model calls are too few to pay for timing" in short.line("sample unet2d", 1)
    timed = sampling_choice(model, "auto", "auto", "cpu", batch=4, evaluations=10**6)
    assert timed.chosen_by == "timed" and len(timed.timings) >= 2
    assert sampling_choice(model, "auto", "auto", "cpu", batch=4, evaluations=10**6).chosen_by == "cached"
    explicit = sampling_choice(model, "fp32", True, "cpu", batch=4, evaluations=10**6)
    assert (explicit.precision, explicit.channels_last, explicit.chosen_by) == ("fp32", True, "params")


def test_the_candidates_are_timed_in_turns(cache):
    """One step of each per round, the first of a round rotating: a burst of other work slows every candidate."""
    steps = []

    def setup(candidate):
        def step():
            steps.append(candidate)
            time.sleep(0.001)
            return 1.0

        return step

    resolve(run_step=setup)
    timed = steps[2 * tuning.WARMUP :]
    assert len(timed) >= 2 * tuning.MIN_TIMED
    rounds = [timed[i : i + 2] for i in range(0, len(timed) - 1, 2)]
    assert all(set(r) == {FP32_NCHW, FP32_NHWC} for r in rounds), rounds
    assert rounds[0] != rounds[1]  # the order rotates


def test_a_busy_or_noisy_timing_is_used_but_not_kept(cache, monkeypatch):
    seconds = {FP32_NCHW: 0.004, FP32_NHWC: 0.001}
    monkeypatch.setattr(tuning, "cpu_use", lambda: (0.0, 0.0, 0.0))
    monkeypatch.setattr(tuning, "busy_share", lambda before, after: 0.45)
    busy = resolve(run_step=sleeper(seconds))
    assert (busy.channels_last, busy.chosen_by) == (True, "timed") and not cache.exists()
    assert "chose fp32 NHWC (not cached: other processes used 45% of its CPUs while timing; timed again next run)" in (
        busy.line("train-unet2d", 2)
    )
    assert resolve(run_step=sleeper(seconds)).chosen_by == "timed"  # timed again

    monkeypatch.setattr(tuning, "busy_share", lambda before, after: 0.0)
    monkeypatch.setattr(tuning, "NOISY_SPREAD", 1.3)
    jumpy = iter([0.001, 0.02] * 100)

    def noisy(candidate):
        def step():
            time.sleep(next(jumpy))
            return 1.0

        return step

    choice = resolve(run_step=noisy)
    assert "not cached: its step times spread" in choice.why and not cache.exists()


def test_busy_share_is_what_other_processes_took_of_this_processs_cpus(monkeypatch):
    monkeypatch.setattr(tuning.os, "sched_getaffinity", lambda pid: {0, 1})
    # 2 s of wall clock on 2 CPUs: 3 CPU seconds busy, 1 of them ours: the others took half of the 4 available.
    assert tuning.busy_share((10.0, 5.0, 100.0), (12.0, 6.0, 103.0)) == pytest.approx(0.5)
    assert tuning.busy_share((10.0, 5.0, 100.0), (12.0, 9.0, 103.0)) == 0.0  # ours alone (counted apart)
    assert tuning.busy_share(None, (12.0, 6.0, 103.0)) == 0.0  # unknown (not Linux): not busy
    reading = tuning.cpu_use()
    assert reading is None or (len(reading) == 3 and all(x >= 0 for x in reading))


def test_a_run_far_slower_than_its_timing_drops_the_cache_entry(cache, capsys):
    seconds = {FP32_NCHW: 0.004, FP32_NHWC: 0.001}
    choice = resolve(run_step=sleeper(seconds))
    rate = dict(choice.timings)["fp32 NHWC"]
    tuning.check_rate("train-unet2d", choice, 0.8 * rate)  # overheads a run has and a timing does not
    assert resolve(run_step=sleeper(seconds)).chosen_by == "cached" and not capsys.readouterr().out
    cached = resolve(run_step=sleeper(seconds))
    tuning.check_rate("train-unet2d", cached, 0.3 * rate)
    out = capsys.readouterr().out
    assert f"below 50% of the {rate:.0f} img/s that fp32 NHWC was timed at" in out and "timing again next run" in out
    assert resolve(run_step=sleeper(seconds)).chosen_by == "timed"
    # A choice the rule or the params made has no timing to fall short of.
    explicit = resolve("fp32", True, run_step=sleeper(seconds))
    tuning.check_rate("train-unet2d", explicit, 1.0)
    assert not capsys.readouterr().out
