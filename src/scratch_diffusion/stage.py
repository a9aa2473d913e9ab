"""What every stage's entry point shares: bad input is one clear line on stderr and a non-zero exit, no traceback;
a finished stage records its cost."""

from __future__ import annotations

import os
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

from scratch_diffusion.config import ParamsError
from scratch_diffusion.data import DataError
from scratch_diffusion.files import DiskFullError, write_json


class StageError(RuntimeError):
    """A stage cannot run (e.g. an upstream output is missing); the message says what to do."""


def run_stage(main: Callable[[], dict | None], record_cost: bool = True) -> None:
    """Run a stage's `main`; on success record its cost in metrics/cost/<stage>.json (a DVC metric): wall time
    and peak resident memory, plus what `main` returns (the precision and layout it ran with), so `dvc exp show`
    and benchmarks/speed.py can tell what each stage costs and on what."""
    start = time.perf_counter()
    try:
        ran_with = main() or {}
        if record_cost and int(os.environ.get("RANK", "0")) == 0:  # under a launcher, the main process speaks
            stage = Path(sys.argv[0]).stem.replace("_", "-")
            peak_kib = max(peak_rss_kib(), resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
            write_json(
                f"metrics/cost/{stage}.json",
                {
                    "wall_s": round(time.perf_counter() - start, 2),
                    "peak_rss_mib": round(peak_kib / 1024, 1),
                    **ran_with,
                },
            )
    except (ParamsError, DataError, StageError, ConnectionError, DiskFullError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def peak_rss_kib() -> int:
    """This process's own peak resident memory. Linux's ru_maxrss survives fork and exec, so a stage started by a
    large parent (dvc) would report the parent's peak; VmHWM belongs to this process's memory map alone."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux; elsewhere the best there is


def duration(seconds: float) -> str:
    """45 s, 12 min, 2.3 h."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"
