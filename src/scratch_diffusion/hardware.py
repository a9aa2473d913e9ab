"""What machine a figure was measured on, so that timings from different machines are never mixed."""

from __future__ import annotations

import contextlib
import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else what `platform` knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def has_cpu_flag(flag: str) -> bool:
    """Whether the CPU advertises `flag` (e.g. avx512_bf16) in /proc/cpuinfo; False where that is not readable."""
    with contextlib.suppress(OSError):
        return flag in Path("/proc/cpuinfo").read_text().split()
    return False
