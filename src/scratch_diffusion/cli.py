"""Shared entry-point behaviour: bad input is one clear line on stderr and a non-zero exit, no traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable

from scratch_diffusion.config import ParamsError
from scratch_diffusion.data import DataError


class StageError(RuntimeError):
    """A stage cannot run (e.g. an upstream output is missing); the message says what to do."""


def run_stage(main: Callable[[], None]) -> None:
    try:
        main()
    except (ParamsError, DataError, StageError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
