"""What the machine does natively, and the precision and memory layout chosen from it.

`auto` in params.yaml (the default of every precision and layout knob) is resolved here, from facts about the
hardware and never from one machine's benchmark: bf16 only where the hardware computes it natively (a CUDA GPU that
supports it; a CPU with AVX512-BF16 or AMX), because PyTorch emulates bf16 elsewhere, 7-14x slower than fp32.
`choose` is a pure function of (device type, CPU flags, CUDA bf16 support), so every machine class can be tested
from any machine; `detect` reads those facts from this one.
"""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from scratch_diffusion.choices import TRAIN_PRECISIONS

LAYOUTS = ("auto", True, False)  # channels_last: auto, or true (NHWC) / false (NCHW)

# CPU flags (as /proc/cpuinfo spells them) that mean bf16 arithmetic in hardware.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")

# Whether the NHWC layout makes a network's training step faster (benchmarks/speed.py): the BasicUNet's
# convolutions gained from it on every CPU class measured; the UNet2DModel's step got slower (its time goes to
# attention, which NHWC does not help).
CHANNELS_LAST = {"basic": True, "unet2d": False}


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
    """What a stage runs with: the resolved precision and layout, and a warning when a request will be slow."""

    precision: str  # fp32 | bf16 | fp16
    channels_last: bool
    hardware: Hardware
    warning: str = ""

    def line(self, stage: str, threads: int) -> str:
        """The one line a stage prints when it starts, e.g. 'train-unet2d: fp32 (CPU: AVX2, no native bf16), NCHW,
        2 threads'."""
        layout = "NHWC" if self.channels_last else "NCHW"
        return f"{stage}: {self.precision} ({self.hardware.describe()}), {layout}, {threads} threads"

    def announce(self, stage: str) -> None:
        """Print the line, and first the warning if there is one (on stderr), as a stage starts."""
        import sys

        if self.warning:
            print(f"warning: {stage}: {self.warning}", file=sys.stderr, flush=True)
        print(self.line(stage, threads()), flush=True)

    def as_params(self, prefix: str = "resolved.") -> dict[str, str | bool]:
        """What ran, for MLflow params and metrics/cost/<stage>.json."""
        return {
            f"{prefix}precision": self.precision,
            f"{prefix}channels_last": self.channels_last,
            f"{prefix}hardware": self.hardware.describe(),
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


def for_sampling(precision: str, device) -> Choice:
    """The choice for model evaluations while sampling: the precision only (models keep their saved layout)."""
    return choose("unet2d", precision, False, detect(device))


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
