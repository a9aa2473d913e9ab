"""The Accelerate training loop shared by every model: device, mixed precision, several processes.

The whole training split arrives as one uint8 tensor (N, C, H, W); batches are converted to float on the device,
so there is no per-item PIL decode in the hot loop. `loss_fn(model, x0)` holds everything model-specific
(corruption, objective, weighting), so this loop never asks which network it trains.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import broadcast_object_list, set_seed
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, RandomSampler, TensorDataset
from tqdm.auto import tqdm

from scratch_diffusion.choices import LR_SCHEDULES, MIXED_PRECISIONS
from scratch_diffusion.files import DiskFullError, disk_full_reported, write_json
from scratch_diffusion.hardware import Choice, choose, detect
from scratch_diffusion.identity import digest, what_changed
from scratch_diffusion.stage import StageError, duration
from scratch_diffusion.tuning import Candidate

try:
    import fcntl
except ImportError:  # not POSIX: no locks (two trainings of one input at once are then not refused)
    fcntl = None


def make_accelerator(mixed_precision: str = "fp32") -> Accelerator:
    """Accelerator for `mixed_precision` in fp32 | bf16 | fp16 (params say fp32 where Accelerate says "no":
    YAML 1.1 reads an unquoted `no` as false, and `dvc exp run -S` writes values unquoted). The value is passed
    explicitly, so it wins over what `accelerate config` saved (Accelerate reads that only when given None)."""
    if mixed_precision not in MIXED_PRECISIONS:
        raise ValueError(f"unknown mixed precision {mixed_precision!r}; allowed: {', '.join(MIXED_PRECISIONS)}")
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") != MIXED_PRECISIONS[mixed_precision]:
        # One process that trains a second network in another precision (a benchmark, an ablation, the tests):
        # Accelerate keeps one precision per process and refuses a change, so its state is started afresh, keeping
        # the processes' group (PartialState), as transformers' Trainer does for each of its runs.
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision=MIXED_PRECISIONS[mixed_precision], cpu=_joined_on_cpu())


def _joined_on_cpu() -> bool:
    # Started by torchrun (or mpirun) on a machine without GPUs, Accelerate joins the processes only when told to
    # use the CPU; otherwise each process would train alone, as its own main process. `accelerate launch --cpu`
    # says so through ACCELERATE_USE_CPU.
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1 or "LOCAL_RANK" in os.environ
    forced = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return forced or (launched and not torch.cuda.is_available())


def stage_accelerator(
    stage: str,
    network: str,
    precision: str,
    channels_last: str | bool,
    tune: Callable[[Choice, torch.device, int], Choice] | None = None,
) -> tuple[Accelerator, Choice]:
    """The Accelerator for a training stage, with `auto` precision and layout resolved for the device it runs on:
    by `tune(rule, device, processes)` (tuning.resolve through recipe.train_model) where given, else by the rule
    (hardware.choose). With several processes the main one times and the others take its choice. Says what it
    chose in one line, and warns when an explicit choice is emulated and slow."""
    state = PartialState(cpu=_joined_on_cpu())  # the device Accelerator will use, before it exists
    choice = choose(network, precision, channels_last, detect(state.device.type))
    if tune is not None:
        if state.is_main_process:
            choice = tune(choice, state.device, state.num_processes)
        if state.num_processes > 1:
            choice = broadcast_object_list([choice])[0]
    accelerator = make_accelerator(choice.precision)
    if accelerator.is_main_process:
        choice.announce(stage)
    return accelerator, choice


def timing_step(
    model: torch.nn.Module,
    loss_fn: Callable[..., torch.Tensor],
    images: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    lr: float,
    device: torch.device,
) -> Callable[[Candidate], Callable[[], float]]:
    """For tuning.measure: `fit`'s step on `images` (uint8, one batch) with a fresh copy of `model` and its Adam, in
    a candidate's precision (autocast, as Accelerate's mixed precision; fp16 with a loss scaler) and layout. The
    model given is not touched."""
    x01 = images.float() / 255
    extra = () if labels is None else (labels.to(device),)

    def setup(candidate: Candidate) -> Callable[[], float]:
        layout = torch.channels_last if candidate.channels_last else torch.contiguous_format
        net = copy.deepcopy(model).to(device, memory_format=layout).train()
        optimizer = torch.optim.Adam(net.parameters(), lr=lr, fused=device.type in ("cpu", "cuda") or None)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(candidate.precision)
        scaler = torch.amp.GradScaler(device.type) if candidate.precision == "fp16" else None
        x0 = x01.to(device).contiguous(memory_format=layout)

        def step() -> float:
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = loss_fn(net, x0, *extra)
            optimizer.zero_grad(set_to_none=True)
            if scaler is None:
                loss.backward()
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            return float(loss.detach())

        return step

    return setup


class EMA:
    """Exponential moving average of a model's weights, the copy that samples and gets saved.

    decay_k = min(decay, (1 + k) / (warmup + k)) after k updates: early on the average follows the weights closely,
    so a run of ~1.4k steps is not stuck near its initialisation (diffusers' EMAModel with power 3/4 warm-up
    reaches 0.999 only after ~10k steps). Until the cap `decay` is reached this is a power-function average
    (Karras et al. 2024, EDM2; exponent warmup - 2) whose weights are on average k / warmup steps old: warmup 10
    averages over about the last tenth of the run, warmup 4 over about its last quarter.
    """

    def __init__(self, model: torch.nn.Module, decay: float, warmup: int = 10):
        if warmup < 2:  # warmup 1 would never move from the initial weights
            raise ValueError(f"EMA warmup: got {warmup}, allowed: >= 2")
        self.decay = decay
        self.warmup = warmup
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (self.warmup + self.updates))
        ema_params = list(self.model.parameters())
        params = [p.detach().to(e.dtype) for p, e in zip(model.parameters(), ema_params, strict=True)]
        torch._foreach_lerp_(ema_params, params, 1 - decay)  # e <- e + (1 - decay) * (p - e)
        for e, b in zip(self.model.buffers(), model.buffers(), strict=True):
            e.copy_(b)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = int(state["updates"])


class Horizons:
    """Several EMAs of one run (one per warm-up, the same cap `decay`) behind the interface that `fit` drives
    (update, model, updates): the EMA never feeds back into training, so K horizons cost one training."""

    def __init__(self, model: torch.nn.Module, decay: float, warmups: Sequence[int]):
        if not warmups:
            raise ValueError("Horizons: got no warm-ups; allowed: one or more")
        self.emas = {w: EMA(model, decay, w) for w in warmups}
        self.model = self.emas[warmups[0]].model  # what fit moves to the device; the rest follow at the first update
        self.updates = 0

    def update(self, model: torch.nn.Module) -> None:
        if self.updates == 0:
            device = next(model.parameters()).device
            for ema in self.emas.values():
                ema.model.to(device)
        self.updates += 1
        for ema in self.emas.values():
            ema.update(model)


@dataclass
class Checkpointing:
    """Where and how often `fit` saves its full state (Accelerate's save_state: model, optimizer, lr schedule,
    EMA, RNG states, plus the step, data position and loss history), and the identity a checkpoint must carry to
    be resumed from (identity.run_identity: params, data, code). A checkpoint of other inputs, or of another
    number of processes (each process has its own RNG state and data shard), is never resumed: it is cleared."""

    dir: Path
    every: int
    keep: int = 2
    identity: dict = field(default_factory=dict)
    run_id: str = ""  # the MLflow run a resumed training continues
    # As set by the launcher (torchrun, accelerate launch); 1 for a plain `python stages/...`.
    num_processes: int = field(default_factory=lambda: int(os.environ.get("WORLD_SIZE", "1")))


class _Progress:
    """Everything besides weights and RNG that a resumed run needs to continue bit for bit (registered with
    Accelerate for checkpointing: it has state_dict / load_state_dict)."""

    def __init__(self):
        self.step = self.epoch = self.batch_in_epoch = self.seen = 0
        self.window = [0.0, 0]  # loss sum and count since the last logged point
        self.epoch_acc = [0.0, 0]
        self.loss_curve: list[list[float]] = []
        self.epoch_losses: list[float] = []
        self.run_id = ""
        self.train_s = 0.0  # seconds spent training up to this checkpoint, over all resumes

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        vars(self).update(state)


COMPLETE = "complete.json"  # written last: a checkpoint folder without it was interrupted mid-save


def _mismatch(info: dict, ckpt: Checkpointing) -> str:
    """Why a checkpoint's marker does not belong to this run ('' if it does)."""
    made_by = info.get("num_processes", 1)
    if made_by != ckpt.num_processes:
        return f"made by {made_by} processes, this run has {ckpt.num_processes}"
    if "identity" not in info:
        return "made before inputs were recorded"
    return what_changed(info["identity"], ckpt.identity)


def find_checkpoints(ckpt: Checkpointing, log=print) -> list[tuple[Path, dict]]:
    """Complete checkpoints of exactly this run's inputs, newest first. The others (interrupted mid-save, an
    unreadable marker, other inputs) are reported, one line per reason, and skipped."""
    found, other = [], {}
    for path in sorted(Path(ckpt.dir).glob("step-*"), reverse=True):
        marker = path / COMPLETE
        if not marker.is_file():
            log(f"checkpoint {path}: incomplete (no {COMPLETE}), skipped")
            continue
        try:
            info = json.loads(marker.read_text())
        except (OSError, ValueError) as e:
            log(f"checkpoint {path}: unreadable {COMPLETE} ({type(e).__name__}), skipped")
            continue
        reason = _mismatch(info, ckpt) if isinstance(info, dict) else f"{COMPLETE} is no mapping"
        if reason:
            other.setdefault(reason, []).append(path)
        else:
            found.append((path, info))
    for reason, paths in other.items():
        what = f"{len(paths)} checkpoints" if len(paths) > 1 else "a checkpoint"
        then = "not resumed from" if found else "starting fresh"
        log(f"{ckpt.dir}: {what} of other inputs ({reason}): {then}, cleared")
    return found


def _newest_marker(folder: Path) -> dict | None:
    for marker in sorted(folder.glob(f"step-*/{COMPLETE}"), reverse=True):
        try:
            info = json.loads(marker.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(info, dict):
            return info
    return None


@contextmanager
def claim_checkpoints(stage_dir: str | Path, identity: dict, log=print) -> Iterator[Path]:
    """The checkpoint folder of exactly these inputs, `<stage_dir>/<digest of identity>`, held by this process while
    the block runs (an exclusive lock on its `.lock`).

    Checkpoints live outside DVC's outputs, keyed by their inputs, so that nothing DVC restores (`dvc exp run` puts
    back the workspace's cached outputs) can replace a killed run's progress, and a rerun with the same inputs finds
    its own folder again. The folders of other inputs that no running training holds are cleared, with one line
    that says what changed; a folder of the same inputs held by another process is refused.
    """
    stage_dir = Path(stage_dir)
    folder = stage_dir / digest(identity)
    stage_dir.mkdir(parents=True, exist_ok=True)
    # Claims and clearings of one stage's folders one at a time: a folder is never cleared between its creation and
    # its owner's lock.
    with open(stage_dir / ".lock", "a") as stage_lock:
        if fcntl is not None:
            fcntl.flock(stage_lock, fcntl.LOCK_EX)
        folder.mkdir(exist_ok=True)
        lock = open(folder / ".lock", "a")  # noqa: SIM115 (held beyond this block, closed below)
        if fcntl is not None:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.close()
                raise StageError(
                    f"{folder}: another process is training exactly these inputs; wait for it to finish or stop it"
                ) from None
        cleared = [
            r for p in sorted(stage_dir.iterdir()) if p.is_dir() and p != folder and (r := _clear_idle(p, identity))
        ]
    try:
        then = "not resumed from" if any(folder.glob(f"step-*/{COMPLETE}")) else "starting fresh"
        for reason in dict.fromkeys(cleared):
            log(f"{stage_dir}: checkpoints of other inputs ({reason}): {then}, cleared")
        yield folder
    finally:
        lock.close()  # releases the lock


def _clear_idle(other: Path, identity: dict) -> str:
    """Remove `other`, a folder of checkpoints of other inputs, unless a running training holds it; returns what
    changed since it was made ('' if it held no checkpoint or is in use)."""
    lock_path = other / ".lock"
    with open(lock_path, "a") if lock_path.exists() else nullcontext() as lock:
        if lock is not None and fcntl is not None:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return ""  # another experiment is training those inputs right now
        reason = ""
        if other.name.startswith("step-"):  # the layout of older versions: one folder for every input
            reason = "made before inputs were recorded"
        elif any(other.glob(f"step-*/{COMPLETE}")):
            info = _newest_marker(other)
            recorded = info is not None and "identity" in info
            reason = what_changed(info["identity"], identity) if recorded else "made before inputs were recorded"
        shutil.rmtree(other, ignore_errors=True)
    return reason


def resumable_run_id(ckpt: Checkpointing | None) -> str | None:
    """The MLflow run id stored with the newest checkpoint that `fit` would resume from."""
    found = find_checkpoints(ckpt, log=lambda *a: None) if ckpt is not None else []
    return found[0][1].get("run_id") or None if found else None


class Eta:
    """Says early how long a run of `total` steps will take: once, after the first few steps (the very first pays
    one-off costs, so it is not counted), one line with the measured rate and the time left; then `left(step)` for
    the progress lines."""

    WARMUP, MEASURE = 1, 5

    def __init__(self, desc: str, total: int, first: int, images_per_step: int):
        self.desc, self.total, self.images_per_step = desc, total, images_per_step
        self.from_step, self.report_at = first + self.WARMUP, first + self.WARMUP + self.MEASURE
        self.from_time = self.step_s = None

    def tick(self, step: int) -> None:
        if step == self.from_step:
            self.from_time = time.perf_counter()
        elif step == self.report_at and step < self.total and self.from_time is not None:
            self.step_s = (time.perf_counter() - self.from_time) / (step - self.from_step)
            rate = self.images_per_step / self.step_s
            print(
                f"{self.desc}: {rate:.0f} img/s over steps {self.from_step + 1}-{step}; about {self.left(step)} "
                f"left for the {self.total - step} steps to go",
                flush=True,
            )

    def left(self, step: int) -> str:
        if self.step_s is None:
            return "?"
        if step > self.report_at:  # later on, the mean rate so far (grids and checkpoints included)
            self.step_s = (time.perf_counter() - self.from_time) / (step - self.from_step)
        return duration((self.total - step) * self.step_s)


@dataclass
class TrainResult:
    steps: int = 0
    epoch_losses: list[float] = field(default_factory=list)
    # (step, mean loss over the steps since the previous point): the loss curve that is plotted and logged.
    loss_curve: list[tuple[int, float]] = field(default_factory=list)
    images_per_s: float = 0.0
    wall_s: float = 0.0

    @property
    def final_loss(self) -> float:
        return self.loss_curve[-1][1] if self.loss_curve else math.nan


def _loader(images, labels, batch_size: int, seed: int) -> tuple[DataLoader, torch.Generator]:
    """The data order is a function of (seed, epoch) alone, so a resumed run replays it exactly: the sampler's
    generator (returned) is reseeded at every epoch, and the loader gets its own generator so that creating an
    iterator never draws from the global RNG (which the corruption noise uses)."""
    dataset = TensorDataset(images) if labels is None else TensorDataset(images, labels)
    order = torch.Generator()
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=RandomSampler(dataset, generator=order),
        generator=torch.Generator().manual_seed(seed),
    )
    return loader, order


class _LossMeter:
    """Loss sums of the log window and of the epoch, kept on the device: read back (a device sync) only at a log
    point, at an epoch's end and at a checkpoint. Starts from what a checkpoint recorded."""

    def __init__(self, progress: _Progress, device: torch.device):
        self.window, self.window_n = torch.tensor(progress.window[0], device=device), progress.window[1]
        self.epoch, self.epoch_n = torch.tensor(progress.epoch_acc[0], device=device), progress.epoch_acc[1]

    def add(self, loss: torch.Tensor) -> None:
        self.window += loss.detach().float()
        self.epoch += loss.detach().float()
        self.window_n += 1
        self.epoch_n += 1

    def window_mean(self, accelerator: Accelerator) -> float:
        mean = accelerator.reduce(self.window, "mean").item() / self.window_n
        self.window.zero_()
        self.window_n = 0
        return mean

    def epoch_mean(self, accelerator: Accelerator) -> float:
        return accelerator.reduce(self.epoch, "mean").item() / max(self.epoch_n, 1)

    def record(self, progress: _Progress, epoch_done: bool) -> None:
        progress.window = [self.window.item(), self.window_n]
        progress.epoch_acc = [0.0, 0] if epoch_done else [self.epoch.item(), self.epoch_n]


class _Display:
    """What a person watching sees: a tqdm bar on a terminal, else about 20 plain progress lines, both with the
    time left (Eta); the main process only."""

    def __init__(self, desc: str, total: int, progress: _Progress, images_per_step: int, main: bool):
        self.desc, self.total, self.progress, self.main = desc, total, progress, main
        self.bar = tqdm(
            total=total,
            initial=progress.step,
            desc=desc,
            disable=not (main and sys.stderr.isatty()),
            dynamic_ncols=True,
        )
        self.plain_every = max(1, total // 20)
        self.eta = Eta(desc, total, progress.step, images_per_step)
        self.start, self.seen_at_start = time.perf_counter(), progress.seen

    def step(self, step: int, epoch: int, logged: float | None) -> None:
        if logged is not None:
            self.bar.set_postfix(loss=f"{logged:.4f}", epoch=epoch + 1)
        self.bar.update(1)
        if not self.main:
            return
        self.eta.tick(step)
        if self.bar.disable and (step % self.plain_every == 0 or step == self.total):
            rate = (self.progress.seen - self.seen_at_start) / (time.perf_counter() - self.start)
            curve = self.progress.loss_curve
            shown = f"loss {curve[-1][1]:.4f} " if curve else ""
            print(
                f"{self.desc}: step {step}/{self.total} epoch {epoch + 1} {shown}({rate:.0f} img/s, "
                f"{self.eta.left(step)} left)",
                flush=True,
            )


def lr_factor(schedule: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """The factor on the lr at optimizer step k: linear warm-up from 0 over `warmup_steps`, then 1 (`constant`) or a
    half cosine down to 0 at `total_steps` (`cosine`). These are diffusers' get_scheduler schedules named in
    choices.LR_SCHEDULES (a test compares every step); written here because importing diffusers takes seconds and
    the BasicUNet's stage needs nothing else of it."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; allowed: {', '.join(LR_SCHEDULES)}")

    def factor(k: int) -> float:
        if k < warmup_steps:
            return k / max(1, warmup_steps)
        if schedule == "constant":
            return 1.0
        progress = (k - warmup_steps) / max(1, total_steps - warmup_steps)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return factor


def planned_steps(section, epochs: int, n_images: int, processes: int = 1) -> int:
    """The optimizer steps a training of `section` (its batch size and max_steps) runs for `epochs` epochs."""
    total = epochs * -(-n_images // (section.batch_size * processes))
    return min(total, section.max_steps or total)


def budget_line(
    stage: str, section, epochs: int, n_images: int, processes: int = 1, choice: Choice | None = None
) -> str:
    """What a training stage says first of its budget: 'train-unet2d: 1407 steps (3 epochs of 60000 images at batch
    128); about 45 min at the timed 64 img/s' (the estimate where `choice` timed the step on this machine)."""
    steps = planned_steps(section, epochs, n_images, processes)
    batch = f"batch {section.batch_size}" + (f" x {processes} processes" if processes > 1 else "")
    # A split smaller than a batch is one batch of all of it per epoch (the DataLoader's last batch is kept).
    per_step = min(section.batch_size * processes, n_images)
    if per_step < section.batch_size * processes:
        batch = f"batch {per_step}, all of them ({section.batch_size} asked)"
    line = f"{stage}: {steps} steps ({epochs} epochs of {n_images} images at {batch})"
    if steps < planned_steps(replace(section, max_steps=0), epochs, n_images, processes):
        line = f"{stage}: {steps} steps (max_steps; {epochs} epochs of {n_images} images at {batch} would be more)"
    rate = dict(choice.timings).get(choice.label, math.nan) * processes if choice is not None else math.nan
    if math.isfinite(rate) and rate > 0:
        return f"{line}; about {duration(steps * per_step / rate)} at the timed {rate:.0f} img/s"
    return f"{line}; the time left is said after the first steps"


def fit(
    model: torch.nn.Module,
    loss_fn: Callable[..., torch.Tensor],
    images: torch.Tensor,
    accelerator: Accelerator,
    *,
    batch_size: int,
    lr: float,
    epochs: int,
    seed: int,
    max_steps: int = 0,
    grad_clip: float = 0.0,
    lr_schedule: str = "constant",
    warmup_steps: int = 0,
    ema: EMA | None = None,
    log_every: int = 10,
    on_log: Callable[[int, float], None] | None = None,
    sample_every: int = 0,
    on_sample: Callable[[int, torch.nn.Module], None] | None = None,
    desc: str = "train",
    labels: torch.Tensor | None = None,
    checkpointing: Checkpointing | None = None,
    channels_last: bool = False,
) -> TrainResult:
    """Train `model` on `images` (uint8, (N, 1, H, W)) with Adam; returns losses and throughput.

    With `labels` (N,), the loss is called as `loss_fn(model, x0, y)` (classifiers, class-conditional models).
    `on_log(step, loss)` and `on_sample(step, model)` run on the main process only; `on_sample` gets the EMA
    weights when `ema` is given. `batch_size` is per process: with N processes the global batch is
    N * batch_size, and `lr` applies to that global batch (no automatic scaling).
    With `checkpointing`, the full state is saved every `checkpointing.every` steps and training resumes from the
    newest complete checkpoint of the same inputs (`checkpointing.identity`), ending with the same weights as an
    uninterrupted run.
    `channels_last` trains in the NHWC memory layout (weights and batches), which oneDNN's convolutions prefer.
    """
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr schedule {lr_schedule!r}; allowed: {', '.join(LR_SCHEDULES)}")
    set_seed(seed, device_specific=True)  # seed + process index: each shard draws its own noise
    loader, order = _loader(images, labels, batch_size, seed)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=layout)
    # The fused kernel updates all parameters in one pass (CPU and CUDA): ~5% of a small network's step here.
    fused = accelerator.device.type in ("cpu", "cuda") or None
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, fused=fused)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    if ema is not None:
        ema.model.to(accelerator.device)
    total = min(epochs * len(loader), max_steps or epochs * len(loader))
    # Warm-up then constant or cosine decay to 0, stepped once per optimizer step (not prepared: with several
    # processes Accelerate would step it once per process).
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(lr_schedule, warmup_steps, total))
    progress = _Progress()
    # Not registered with Accelerate: it unpickles registered objects with weights_only=False. The lr schedule
    # and progress go to JSON, the EMA weights to safetensors (see _save / _resume).
    extras = {"scheduler": scheduler, "progress": progress, "ema": ema, "model": model, "optimizer": optimizer}
    main = accelerator.is_main_process
    if checkpointing is not None:
        progress.run_id = checkpointing.run_id
        _resume(accelerator, checkpointing, extras, main)
    averaged = lambda: ema.model if ema is not None else accelerator.unwrap_model(model)  # noqa: E731
    if on_sample and sample_every and main and progress.step == 0:
        # The untrained model's grid: a baseline for the later ones, and the step MLflow's image slider opens at.
        on_sample(0, averaged())
        model.train()
    display = _Display(desc, total, progress, batch_size * accelerator.num_processes, main)
    start, seen_at_start, train_s_before = time.perf_counter(), progress.seen, progress.train_s
    step = progress.step
    for epoch in range(progress.epoch, epochs):
        if step >= total:
            break
        model.train()
        order.manual_seed(seed + epoch)
        skip = progress.batch_in_epoch if epoch == progress.epoch else 0
        meter, batch_in_epoch = _LossMeter(progress, accelerator.device), skip
        for batch, *y in accelerator.skip_first_batches(loader, skip) if skip else loader:
            x0 = (batch.float() / 255).contiguous(memory_format=layout)  # [0, 1]; loss_fn maps to its model's range
            loss = loss_fn(model, x0, *y)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            if grad_clip and accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            scheduler.step()
            if ema is not None:
                ema.update(model)
            step, batch_in_epoch = step + 1, batch_in_epoch + 1
            progress.seen += x0.shape[0] * accelerator.num_processes
            meter.add(loss)
            last, logged = step == total, None
            if step % log_every == 0 or last:
                logged = meter.window_mean(accelerator)
                progress.loss_curve.append([step, logged])
                if main and on_log:
                    on_log(step, logged)
            display.step(step, epoch, logged)
            if on_sample and sample_every and step % sample_every == 0 and not last:
                accelerator.wait_for_everyone()
                if main:
                    on_sample(step, averaged())
                model.train()
            epoch_done = batch_in_epoch == len(loader)
            if epoch_done:
                progress.epoch_losses.append(meter.epoch_mean(accelerator))
            if checkpointing is not None and (step % checkpointing.every == 0 or last):
                progress.step = step  # exactly where we are
                progress.epoch, progress.batch_in_epoch = (epoch + 1, 0) if epoch_done else (epoch, batch_in_epoch)
                meter.record(progress, epoch_done)
                progress.train_s = train_s_before + time.perf_counter() - start
                _save(accelerator, checkpointing, extras, main)
            if last:
                break
        if step >= total and batch_in_epoch < len(loader):  # max_steps ended the run mid-epoch: its mean too
            progress.epoch_losses.append(meter.epoch_mean(accelerator))
        progress.window, progress.epoch_acc = [0.0, 0], [0.0, 0]
    display.bar.close()
    accelerator.wait_for_everyone()
    # The run's own time and speed over all its resumes: a run resumed from its final checkpoint reports the
    # figures of the run that made it (a checkpoint from before this was recorded counts from the resume).
    wall = train_s_before + time.perf_counter() - start
    seen = progress.seen if train_s_before else progress.seen - seen_at_start
    if accelerator.num_processes > 1:
        _say_weights(accelerator, model, ema, desc)
    curve = [(int(s), float(v)) for s, v in progress.loss_curve]
    return TrainResult(step, list(progress.epoch_losses), curve, seen / wall if wall > 0 else 0.0, wall)


def _say_weights(accelerator: Accelerator, model, ema: EMA | None, desc: str) -> None:
    """Data-parallel replicas must end identical; each process says what it holds, so a divergence shows."""
    held = f"weights sha256 {weights_digest(accelerator.unwrap_model(model))}"
    if ema is not None:
        held += f", EMA sha256 {weights_digest(ema.model)}"
    # One write per line: the processes share stdout, and print() writes the newline separately.
    sys.stdout.write(f"{desc}: process {accelerator.process_index} of {accelerator.num_processes} ends with {held}\n")
    sys.stdout.flush()


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of a model's state (names, shapes, dtypes and bytes), the same for bit-identical weights."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _save(accelerator: Accelerator, ckpt: Checkpointing, extras: dict, main: bool) -> None:
    """save_state on every process (it synchronises: model as safetensors, optimizer, RNG states), then our own
    state, the completion marker and pruning on the main one."""
    progress = extras["progress"]
    path = Path(ckpt.dir) / f"step-{progress.step:07d}"
    try:
        with disk_full_reported(path, folder=ckpt.dir):
            accelerator.save_state(str(path))
            accelerator.wait_for_everyone()
            if main:
                _save_ours(path, ckpt, extras, accelerator.num_processes)
    except DiskFullError:
        shutil.rmtree(path, ignore_errors=True)  # incomplete: the older checkpoints stay the ones to resume
        raise
    accelerator.wait_for_everyone()


def _save_ours(path: Path, ckpt: Checkpointing, extras: dict, num_processes: int) -> None:
    """The main process's part of a checkpoint: EMA weights, lr schedule and progress, the completion marker (last),
    then pruning to the newest `keep`."""
    progress, ema = extras["progress"], extras["ema"]
    state = {"progress": progress.state_dict(), "scheduler": extras["scheduler"].state_dict()}
    if ema is not None:
        state["ema_updates"] = ema.updates
        save_file({k: v.contiguous() for k, v in ema.model.state_dict().items()}, str(path / "ema.safetensors"))
    (path / "train_state.json").write_text(json.dumps(state))
    marker = {
        "step": progress.step,
        "identity": ckpt.identity,
        "run_id": progress.run_id,
        "num_processes": num_processes,
    }
    write_json(path / COMPLETE, marker)  # atomic: a marker is whole or absent
    complete = sorted(p for p in Path(ckpt.dir).glob("step-*") if (p / COMPLETE).is_file())
    for old in complete[: -ckpt.keep]:
        shutil.rmtree(old, ignore_errors=True)


def _resume(accelerator: Accelerator, ckpt: Checkpointing, extras: dict, main: bool) -> None:
    """Restore everything from the newest checkpoint that loads whole, or nothing: a checkpoint that fails part-way
    (its weights loaded, its train_state.json unreadable) must not leave its weights, optimizer or RNG state in a
    run that then starts at step 0."""
    progress, ema = extras["progress"], extras["ema"]
    log = print if main else (lambda *a: None)
    usable = find_checkpoints(ckpt, log=log)
    if main:  # incomplete ones and those of other inputs can never be resumed: clear them out of the way
        keep = {p for p, _ in usable}
        for stale in Path(ckpt.dir).glob("step-*"):
            if stale not in keep:
                shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    if not usable:
        return
    fresh = _snapshot(extras)
    for path, _ in usable:
        try:
            # Our own files first (cheap, and the likelier to be damaged), then Accelerate's.
            state = json.loads((path / "train_state.json").read_text())
            ema_weights = None if ema is None else load_file(path / "ema.safetensors", device=str(accelerator.device))
            accelerator.load_state(str(path))  # model, optimizer, RNG: all loaded weights-only
            extras["scheduler"].load_state_dict(state["scheduler"])
            if ema is not None:
                ema.model.load_state_dict(ema_weights)
                ema.updates = state["ema_updates"]
            progress.load_state_dict(state["progress"])
        except Exception as e:  # truncated or corrupt files: back to the fresh state, then an older checkpoint
            _restore(extras, fresh)
            warnings.warn(
                f"checkpoint {path} could not be loaded ({type(e).__name__}: {e}); trying an older one", stacklevel=2
            )
            continue
        log(f"resumed from {path} (step {progress.step})")
        return
    log(f"no checkpoint in {ckpt.dir} could be loaded whole; training starts from step 0")


def _snapshot(extras: dict) -> dict:
    """Copies of everything a resume may overwrite: weights, optimizer, lr schedule, EMA, progress, RNG states."""
    import random

    import numpy as np

    ema = extras["ema"]
    return {
        "model": copy.deepcopy(extras["model"].state_dict()),
        "optimizer": copy.deepcopy(extras["optimizer"].state_dict()),
        "scheduler": copy.deepcopy(extras["scheduler"].state_dict()),
        "progress": copy.deepcopy(extras["progress"].state_dict()),
        "ema": (copy.deepcopy(ema.model.state_dict()), ema.updates) if ema is not None else None,
        "rng": (
            random.getstate(),
            np.random.get_state(),
            torch.get_rng_state(),
            torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        ),
    }


def _restore(extras: dict, fresh: dict) -> None:
    import random

    import numpy as np

    extras["model"].load_state_dict(fresh["model"])
    extras["optimizer"].load_state_dict(copy.deepcopy(fresh["optimizer"]))
    extras["scheduler"].load_state_dict(fresh["scheduler"])
    extras["progress"].load_state_dict(copy.deepcopy(fresh["progress"]))
    if fresh["ema"] is not None:
        extras["ema"].model.load_state_dict(fresh["ema"][0])
        extras["ema"].updates = fresh["ema"][1]
    py, np_state, cpu, cuda = fresh["rng"]
    random.setstate(py)
    np.random.set_state(np_state)
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
