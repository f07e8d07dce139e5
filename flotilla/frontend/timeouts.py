"""The bound every control call puts on a time-out argument (shared by the control plane and weights/)."""

from __future__ import annotations

import math
from typing import Any

MAX_TIMEOUT_S = 7 * 24 * 3600.0  # a week: longer is a mistake (and time.monotonic() + 1e308 is inf)


def check_timeout(name: str, value: Any, allow_zero: bool = False) -> float:
    """A time-out in seconds: a finite number > 0 (>= 0 with ``allow_zero``), at most a week."""
    number = not isinstance(value, bool) and isinstance(value, (int, float))
    if not number or value < 0 or value > MAX_TIMEOUT_S or not math.isfinite(value) or \
            (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name}: must be a finite number of seconds {bound} and <= {MAX_TIMEOUT_S:.0f}, "
                         f"got {value!r}")
    return float(value)
