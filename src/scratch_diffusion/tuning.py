"""`auto` precision and memory layout, chosen by timing the candidates on the machine at hand.

A table of machine classes cannot keep up with the machines this runs on (an AVX-512 CPU without bf16 wanted the
layout that such a table ruled out for the UNet2DModel); a measurement can, as cuDNN's benchmark mode and oneDNN
pick their kernels by timing them. For an `auto` knob, every candidate the hardware admits runs a few steps of the
stage's own work at its batch size (a training step, or a model evaluation for sampling), and the fastest whose loss
stays finite wins. The result is cached per machine, torch, network and batch size in the user's cache folder, so a
machine times once; explicit values are never timed, and a run too short to pay for the timing takes the rule
(`hardware.choose`).

The choice changes speed only: candidates run on a copy of the model under a forked RNG, so a seed gives the
weights of the chosen precision and layout, the same as naming them in params.yaml would.

A timing is kept only when it can be trusted. The candidates are timed in turns (one step each, round after round),
so a burst of other work slows them all alike; a timing during which other processes took a share of this
process's CPUs (Linux: /proc/stat) or whose steps spread widely is used for this run only, said so in the stage's
first line, and timed again next run. A run that trains far slower than its cached choice was timed at says so and
drops the entry: the machine changed, or the timing was wrong.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from scratch_diffusion.files import update_json, write_json
from scratch_diffusion.hardware import Choice, Hardware, cpu_name

CACHE_ENV = "SCRATCH_DIFFUSION_CACHE"  # a folder to keep the timings in instead of the user's cache folder
WARMUP = 1  # untimed steps per candidate: the first call of a precision and layout builds its kernels
MIN_TIMED = 3  # timed steps per candidate at least; the median of them is its rate
MAX_TIMED = 20
CANDIDATE_S = 3.0  # timed seconds per candidate at most (after its warm-up)
SHARE = 0.05  # of a run's steps at most spent timing: a run shorter than that takes the rule
MAX_ENTRIES = 200  # cache entries kept (the newest)
BUSY_SHARE = 0.25  # of this process's CPUs taken by other processes while timing, above which a timing is not kept
NOISY_SPREAD = 1.3  # a candidate's upper / lower quartile step time above which a timing is not kept
SLOW_RUN = 0.5  # a run slower than this share of its cached choice's timed rate drops the entry


@dataclass(frozen=True)
class Candidate:
    precision: str  # fp32 | bf16 | fp16
    channels_last: bool

    @property
    def label(self) -> str:
        return f"{self.precision} {'NHWC' if self.channels_last else 'NCHW'}"


@dataclass(frozen=True)
class Timing:
    candidate: Candidate
    images_per_s: float
    finite: bool = True  # whether every timed step's loss was finite


class TuningError(RuntimeError):
    """No candidate could be used (every one gave a non-finite loss)."""


def candidates(hardware: Hardware, precision: str, channels_last: str | bool, *, training: bool) -> list[Candidate]:
    """What `auto` may choose from on `hardware`: fp32, bf16 where the hardware computes it natively (emulated bf16
    is 7-14x slower: never a candidate), fp16 for training on CUDA (sampling evaluates in fp32 or bf16 only);
    NCHW and NHWC. An explicit precision or layout stays as given."""
    if precision == "auto":
        precisions = ["fp32"]
        if hardware.native_bf16:
            precisions.append("bf16")
        if training and hardware.device == "cuda":
            precisions.append("fp16")
    else:
        precisions = [precision]
    layouts = [False, True] if channels_last == "auto" else [bool(channels_last)]
    return [Candidate(p, cl) for p in precisions for cl in layouts]


def pick(timings: Sequence[Timing]) -> Timing:
    """The fastest timing whose loss stayed finite; the earlier candidate wins a tie."""
    usable = [t for t in timings if t.finite and math.isfinite(t.images_per_s)]
    if not usable:
        tried = ", ".join(t.candidate.label for t in timings) or "none"
        raise TuningError(f"no candidate kept a finite loss (tried: {tried}); set the precision in params.yaml")
    return max(usable, key=lambda t: t.images_per_s)  # max keeps the first of equals


def worth_timing(n_candidates: int, steps: int) -> bool:
    """Whether timing `n_candidates` pays on a run of `steps` steps: it costs at most SHARE of them."""
    return n_candidates > 1 and n_candidates * (WARMUP + MIN_TIMED) <= SHARE * steps


@dataclass(frozen=True)
class Measurement:
    timings: list[Timing]
    busy: float = 0.0  # share of this process's CPUs that other processes used while timing (0 where unknown)
    spread: float = 1.0  # the widest upper / lower quartile ratio of a candidate's step times

    @property
    def distrust(self) -> str:
        """Why this timing must not be kept ('' when it may)."""
        if self.busy > BUSY_SHARE:
            return f"other processes used {self.busy:.0%} of its CPUs while timing"
        if self.spread > NOISY_SPREAD:
            return f"its step times spread {self.spread:.1f}x while timing"
        return ""


def measure(
    run_step: Callable[[Candidate], Callable[[], float]],
    options: Sequence[Candidate],
    *,
    batch: int,
    steps: int,
    device: torch.device | str = "cpu",
) -> Measurement:
    """Time each candidate: `run_step(candidate)` sets it up and returns a function that runs one step and
    returns its loss (any number; it must stay finite). After WARMUP steps each, the candidates take turns, one
    timed step each per round (the first of a round rotates), until each has CANDIDATE_S seconds (or SHARE of the
    run's estimated time, split over the candidates), at least MIN_TIMED and at most MAX_TIMED steps; the median
    step gives images/s. Also measured: how busy the CPUs were and how widely the steps spread. The global RNG is
    left as it was."""
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict[Candidate, list[float]] = {c: [] for c in options}
    finite = dict.fromkeys(options, True)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        live: dict[Candidate, Callable[[], float]] = {}
        for candidate in options:
            try:
                step = run_step(candidate)
                if all(math.isfinite(step()) for _ in range(WARMUP)):
                    live[candidate] = step
                else:
                    finite[candidate] = False
            except RuntimeError as e:  # an op this precision or layout lacks here, or memory it does not fit in
                print(f"warning: {candidate.label} does not run here ({e}); not a candidate", file=sys.stderr)
                finite[candidate] = False
        sync()
        before = cpu_use()
        budget, rounds = CANDIDATE_S, 0
        while live and rounds < MAX_TIMED:
            order = list(live)
            for candidate in order[rounds % len(order) :] + order[: rounds % len(order)]:
                try:
                    start = time.perf_counter()
                    loss = live[candidate]()
                    sync()
                except RuntimeError as e:
                    print(f"warning: {candidate.label} does not run here ({e}); not a candidate", file=sys.stderr)
                    loss = math.nan
                times[candidate].append(time.perf_counter() - start)
                if not math.isfinite(loss):
                    finite[candidate] = False
                    del live[candidate]
            rounds += 1
            if rounds == MIN_TIMED and live:  # the first candidate's pace bounds everyone's
                first = statistics.median(times[next(iter(live))])
                budget = min(CANDIDATE_S, SHARE * first * steps / len(options))
            if rounds >= MIN_TIMED and all(sum(times[c]) >= budget for c in live):
                break
        busy = busy_share(before, cpu_use()) if device.type == "cpu" else 0.0
        del live
    timings = [
        Timing(c, batch / statistics.median(times[c]) if finite[c] and times[c] else math.nan, finite[c])
        for c in options
    ]
    spreads = [_spread(times[c]) for c in options if finite[c] and len(times[c]) >= 2]
    return Measurement(timings, busy, max(spreads, default=1.0))


def _spread(times: Sequence[float]) -> float:
    """Upper over lower quartile of step times: near 1 when every step took as long."""
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return q3 / q1 if q1 > 0 else math.inf


def cpu_use() -> tuple[float, float, float] | None:
    """(wall clock, CPU seconds this process used, CPU seconds the CPUs it may run on were busy), or None where the
    kernel does not say (no /proc/stat: not Linux)."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
        mine = {f"cpu{i}" for i in os.sched_getaffinity(0)}
    except (OSError, AttributeError):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    busy = 0
    for line in lines:
        name, *fields = line.split()
        if name in mine:  # user nice system idle iowait irq softirq steal ...: busy is all but idle and iowait
            values = [int(v) for v in fields[:8]]
            busy += sum(values) - values[3] - values[4]
    own = os.times()
    return time.monotonic(), own.user + own.system, busy / tick


def busy_share(before, after) -> float:
    """The share of this process's CPUs that other processes kept busy between two `cpu_use()` readings."""
    if before is None or after is None or after[0] <= before[0]:
        return 0.0
    wall, own, busy = (b - a for a, b in zip(before, after, strict=True))
    return max(0.0, busy - own) / (wall * len(os.sched_getaffinity(0)))


# --- the cache ----------------------------------------------------------------------------------------------------


def cache_file() -> Path:
    """tuning.json in $SCRATCH_DIFFUSION_CACHE if set, else in the user's cache folder (platformdirs: on Linux
    $XDG_CACHE_HOME/scratch-diffusion, ~/.cache/scratch-diffusion by default)."""
    folder = os.environ.get(CACHE_ENV)
    if not folder:
        import platformdirs

        folder = platformdirs.user_cache_dir("scratch-diffusion", appauthor=False)
    return Path(folder) / "tuning.json"


def machine_key(device: torch.device | str, processes: int = 1) -> dict:
    """The parts of a cache key that name the machine: the GPU (or the CPU model), the threads and processes it
    computes with, and torch's version (its kernels decide the speeds)."""
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return {
        "device": f"{device.type}: {name}",
        "threads": torch.get_num_threads(),
        "processes": processes,
        "torch": torch.__version__,
    }


def network_key(model: torch.nn.Module) -> str:
    """A fingerprint of a network's architecture (its modules and their shapes, not its weights)."""
    return hashlib.sha256(repr(model).encode()).hexdigest()[:16]


def _key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def cached(parts: dict) -> dict | None:
    """The cache entry for `parts` (a key's parts), or None; an unreadable cache file counts as empty."""
    path = cache_file()
    try:
        entries = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        print(f"warning: {path}: unreadable ({e}); timing again", file=sys.stderr, flush=True)
        return None
    entry = entries.get(_key(parts)) if isinstance(entries, dict) else None
    return entry if isinstance(entry, dict) and entry.get("parts") == json.loads(json.dumps(parts)) else None


def forget(parts: dict) -> None:
    """Drop the entry for `parts`: the next run times again."""

    def drop(entries: dict | None) -> dict:
        entries = dict(entries) if isinstance(entries, dict) else {}
        entries.pop(_key(parts), None)
        return entries

    path = cache_file()
    if path.exists():
        try:
            update_json(path, drop)
        except (OSError, ValueError) as e:
            print(f"warning: {path}: cannot drop a timing ({e})", file=sys.stderr)


def store(parts: dict, timings: Sequence[Timing], chosen: Candidate) -> None:
    """Add an entry under the cache's lock (two stages timing at once keep both); the newest MAX_ENTRIES stay. A
    cache that cannot be written is said once and otherwise ignored: the next run times again."""
    entry = {
        "parts": parts,
        "timings": [[t.candidate.precision, t.candidate.channels_last, t.images_per_s, t.finite] for t in timings],
        "chose": [chosen.precision, chosen.channels_last],
        "at": time.time(),
    }

    def add(entries: dict | None) -> dict:
        entries = dict(entries) if isinstance(entries, dict) else {}
        entries[_key(parts)] = entry
        newest = sorted(entries.items(), key=lambda kv: kv[1].get("at", 0) if isinstance(kv[1], dict) else 0)
        return dict(newest[-MAX_ENTRIES:])

    path = cache_file()
    try:
        try:
            update_json(path, add)
        except ValueError:  # not JSON: start it afresh
            write_json(path, add(None))
    except OSError as e:
        print(f"warning: {path}: cannot keep the timings ({e}); the next run times again", file=sys.stderr)


def _from_entry(entry: dict) -> tuple[list[Timing], Candidate]:
    timings = [Timing(Candidate(p, bool(cl)), float(rate), bool(ok)) for p, cl, rate, ok in entry["timings"]]
    return timings, Candidate(entry["chose"][0], bool(entry["chose"][1]))


# --- the entry the stages call -------------------------------------------------------------------------------------


def resolve(
    rule: Choice,
    precision: str,
    channels_last: str | bool,
    *,
    training: bool,
    steps: int,
    batch: int,
    key: dict,
    run_step: Callable[[Candidate], Callable[[], float]],
    device: torch.device | str = "cpu",
) -> Choice:
    """The choice for a stage whose params say `precision` and `channels_last` (`auto` or explicit), doing `steps`
    steps of `batch` images. `rule` is hardware.choose's answer for the same values (its warning is kept):
    returned as it is when nothing is left to choose or the run is too short to pay for timing. Otherwise the cache
    entry for `key` (machine_key, network_key, batch size, ...) and the candidates, else a timing of each candidate
    through `run_step` (see measure), stored in the cache."""
    options = candidates(rule.hardware, precision, channels_last, training=training)
    if len(options) == 1:
        return replace(rule, chosen_by="params")
    if not worth_timing(len(options), steps):
        unit = "steps" if training else "model calls"
        return replace(rule, chosen_by="rule", why=f"{steps} {unit} are too few to pay for timing")
    parts = {**key, "batch": batch, "training": training, "candidates": [c.label for c in options]}
    entry = cached(parts)
    if entry is not None:
        try:
            timings, chosen = _from_entry(entry)
        except (KeyError, TypeError, ValueError, IndexError):
            entry = None
        else:
            how = "cached"
    why = ""
    if entry is None:
        measured = measure(run_step, options, batch=batch, steps=steps, device=device)
        timings = measured.timings
        chosen, how, why = pick(timings).candidate, "timed", measured.distrust
        if why:
            why = f"not cached: {why}; timed again next run"
        else:
            store(parts, timings, chosen)
    found = tuple((t.candidate.label, t.images_per_s) for t in timings)
    return replace(
        rule,
        precision=chosen.precision,
        channels_last=chosen.channels_last,
        chosen_by=how,
        timings=found,
        why=why,
        cache_parts=parts if how == "cached" or not why else None,
    )


def check_rate(stage: str, choice: Choice, images_per_s: float) -> None:
    """After a run (a training, or a model's evaluations while sampling): when it went far slower than its choice
    was timed at (below SLOW_RUN of that rate), say so and drop the cache entry, so that the next run times again
    rather than trusting a timing the machine no longer gives."""
    if choice.cache_parts is None or not math.isfinite(images_per_s):
        return
    timed = dict(choice.timings).get(choice.label, math.nan)
    if math.isfinite(timed) and images_per_s < SLOW_RUN * timed:
        print(
            f"{stage}: ran at {images_per_s:.0f} img/s, below {SLOW_RUN:.0%} of the {timed:.0f} img/s that "
            f"{choice.label} was timed at: the machine was busy or has changed; timing again next run",
            flush=True,
        )
        forget(choice.cache_parts)
