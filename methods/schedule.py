"""Schedules as pure functions of the step, shared by the methods' phases (methods/twist/phases.py) and the
engine's lr / weight-decay schedule (engine/optim.py)."""
from __future__ import annotations

import math


def cosine(step: float, total: float, start: float, end: float) -> float:
    """Cosine from `start` at step 0 to `end` at `total` (held at `end` afterwards)."""
    if total <= 0:
        return end
    t = min(max(step / total, 0.0), 1.0)
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * t))
