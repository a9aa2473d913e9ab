"""What the machine does natively, and the rule that resolves `auto` where nothing is timed.

`auto` in params.yaml (the default of every precision and layout knob) is chosen by timing the candidates on the
machine itself (tuning.py); `choose` here is the rule for what is not timed (a run too short to pay for timing) and
the source of every choice's facts: bf16 only where the hardware computes it natively (a CUDA GPU that supports it;
a CPU with AVX512-BF16 or AMX), because PyTorch emulates bf16 elsewhere, 7-14x slower than fp32. `choose` is a pure
function of (device type, CPU flags, CUDA bf16 support), so every machine class can be tested from any machine;
`detect` reads those facts from this one."""

from __future__ import annotations

import contextlib
import math
import os
import platform
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from scratch_diffusion.choices import TRAIN_PRECISIONS

LAYOUTS = ("auto", True, False)  # channels_last: auto, or true (NHWC) / false (NCHW)

# CPU flags (as /proc/cpuinfo spells them) that mean bf16 arithmetic in hardware.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")

# The layout of a run that is not timed (too short to pay for it): the BasicUNet's convolutions gain from NHWC on
# every CPU class measured; for the UNet2DModel it depends on the machine, so PyTorch's default NCHW. The classifier
# is never timed (recipe.train_model trains the judge in fp32 NCHW everywhere).
CHANNELS_LAST = {"basic": True, "unet2d": False, "classifier": False}


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else what `platform` knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (the first `flags` line of /proc/cpuinfo); empty where that is not readable."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_class(flags: Collection[str]) -> str:
    """The machine class that decides CPU speed here: AMX, AVX512-BF16, AVX512, AVX2 or older."""
    if "amx_bf16" in flags:
        return "AMX"
    if "avx512_bf16" in flags:
        return "AVX512-BF16"
    if "avx512f" in flags:
        return "AVX512"
    return "AVX2" if "avx2" in flags else "pre-AVX2"


@dataclass(frozen=True)
class Hardware:
    """The facts `choose` decides from."""

    device: str  # torch device type: cpu | cuda | mps | ...
    cpu_flags: frozenset[str] = frozenset()
    cuda_bf16: bool = False  # torch.cuda.is_bf16_supported() on that GPU

    @property
    def native_bf16(self) -> bool:
        if self.device == "cuda":
            return self.cuda_bf16
        if self.device == "cpu":
            return any(f in self.cpu_flags for f in NATIVE_BF16_FLAGS)
        return False

    def describe(self) -> str:
        """e.g. 'CPU: AVX2, no native bf16' or 'CUDA: native bf16'."""
        bf16 = "native bf16" if self.native_bf16 else "no native bf16"
        if self.device == "cpu":
            return f"CPU: {cpu_class(self.cpu_flags)}, {bf16}"
        return f"{self.device.upper()}: {bf16}"


@dataclass(frozen=True)
class Choice:
    """What a stage runs with: the resolved precision and layout, how they were chosen, and a warning when a request
    will be slow."""

    precision: str  # fp32 | bf16 | fp16
    channels_last: bool
    hardware: Hardware
    warning: str = ""
    chosen_by: str = "rule"  # params (as given) | rule (choose) | timed | cached (tuning.resolve)
    timings: tuple[tuple[str, float], ...] = ()  # (candidate, images/s; nan: its loss was not finite)
    why: str = ""  # why the rule decided (e.g. a run too short to pay for timing), or why a timing was not cached
    cache_parts: dict | None = field(default=None, compare=False)  # tuning's cache key of a kept timing

    @property
    def label(self) -> str:
        return f"{self.precision} {'NHWC' if self.channels_last else 'NCHW'}"

    def timed(self) -> str:
        """'fp32 NCHW 35 img/s, fp32 NHWC 42' ('' when nothing was timed)."""
        rates = [
            f"{label} {rate:.0f}" if math.isfinite(rate) else f"{label} (loss not finite)"
            for label, rate in self.timings
        ]
        if rates and math.isfinite(self.timings[0][1]):
            rates[0] += " img/s"
        return ", ".join(rates)

    def line(self, stage: str, threads: int) -> str:
        """The one line a stage prints when it starts, e.g. 'train-unet2d: timed fp32 NCHW 35 img/s, fp32 NHWC 42;
        chose fp32 NHWC (cached) (CPU: AVX512, no native bf16), 2 threads'."""
        where = f"({self.hardware.describe()}), {threads} threads"
        if self.chosen_by in ("timed", "cached"):
            cached = " (cached)" if self.chosen_by == "cached" else f" ({self.why})" if self.why else ""
            return f"{stage}: timed {self.timed()}; chose {self.label}{cached} {where}"
        if self.chosen_by == "params":
            return f"{stage}: {self.label} as params say {where}"
        why = f", not timed: {self.why}" if self.why else ""
        return f"{stage}: {self.label} by rule{why} {where}"

    def announce(self, stage: str) -> None:
        """Print the line, and first the warning if there is one (on stderr), as a stage starts."""
        import sys

        if self.warning:
            print(f"warning: {stage}: {self.warning}", file=sys.stderr, flush=True)
        print(self.line(stage, threads()), flush=True)

    def as_params(self, prefix: str = "resolved.") -> dict[str, str | bool]:
        """What ran and why, for MLflow params and metrics/cost/<stage>.json."""
        return {
            f"{prefix}precision": self.precision,
            f"{prefix}channels_last": self.channels_last,
            f"{prefix}hardware": self.hardware.describe(),
            f"{prefix}chosen_by": self.chosen_by,
            f"{prefix}timings": self.timed(),
        }


def machine() -> str:
    """The machine a measurement belongs to, as the ablation results name it: the GPU, else the CPU, its core count
    and its class (speeds and bf16 numbers differ by class, see cpu_class)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{cpu_name()}, {os.cpu_count()} cores, {cpu_class(cpu_flags())}"


def choose(network: str, precision: str, channels_last: str | bool, hardware: Hardware) -> Choice:
    """Resolve `auto` for `network` on `hardware`; explicit values are honoured as given.

    precision auto: bf16 where the hardware computes it natively, else fp32 (fp16 only when asked for: it needs a
    loss scaler and overflows where bf16 does not). channels_last auto: where it measured faster (CHANNELS_LAST).
    An explicit bf16 on a CPU without native bf16 runs, with a warning that it is emulated and slow.
    """
    if network not in CHANNELS_LAST:
        raise ValueError(f"unknown network {network!r}; allowed: {', '.join(CHANNELS_LAST)}")
    if precision not in TRAIN_PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; allowed: {', '.join(TRAIN_PRECISIONS)}")
    if channels_last not in LAYOUTS or not isinstance(channels_last, str | bool):
        raise ValueError(f"unknown channels_last {channels_last!r}; allowed: auto, true, false")
    warning = ""
    if precision == "auto":
        precision = "bf16" if hardware.native_bf16 else "fp32"
    elif precision == "bf16" and hardware.device == "cpu" and not hardware.native_bf16:
        warning = (
            f"bf16 asked for on a CPU without native bf16 ({cpu_class(hardware.cpu_flags)}): PyTorch "
            "emulates it, 7-14x slower than fp32; 'auto' or 'fp32' is faster here"
        )
    if channels_last == "auto":
        channels_last = CHANNELS_LAST[network]
    return Choice(precision, channels_last, hardware, warning)


def for_sampling(precision: str, channels_last: str | bool, device) -> Choice:
    """The rule for model evaluations while sampling: the precision as for training, NCHW for an `auto` layout (the
    layout models load in); samplers.sampling_choice times `auto` where it pays."""
    return choose("unet2d", precision, False if channels_last == "auto" else channels_last, detect(device))


def detect(device) -> Hardware:
    """The facts about this machine for a run on `device` (a torch.device, or its type: cpu, cuda, ...)."""
    import torch

    device = torch.device(device).type
    cuda_bf16 = device == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return Hardware(device, cpu_flags(), cuda_bf16)


def threads() -> int:
    """Threads this process computes with on the CPU (torch's intra-op pool)."""
    import torch

    return torch.get_num_threads() or os.cpu_count() or 1
