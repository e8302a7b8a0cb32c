"""The locator's std schedule: local exploration that starts wide and narrows over training.

The std is not learned (method.md, "Local exploration"): it is a function of the number of
environment steps sampled so far. The learner evaluates it after every update and writes it into a
buffer of the RLModule, which reaches the EnvRunners with the normal weight sync.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

StdShape = Literal["linear", "exponential", "cosine"]
STD_SHAPES: tuple[str, ...] = get_args(StdShape)


@dataclass(frozen=True)
class StdSchedule:
    """std(t) from `start` to `end` over `horizon` env steps, then constant at `end`.

    shape: "linear" interpolates linearly, "exponential" geometrically (start * (end/start)^f),
    "cosine" follows half a cosine (slow - fast - slow).
    """

    start: float = 0.3
    end: float = 0.05
    shape: StdShape = "exponential"
    horizon: int = 200_000

    def __post_init__(self):
        if self.start <= 0 or self.end <= 0:
            raise ValueError(f"std schedule: start and end must be > 0, got {self.start}, {self.end}")
        if self.horizon <= 0:
            raise ValueError(f"std schedule: horizon must be > 0 env steps, got {self.horizon}")
        if self.shape not in STD_SHAPES:
            raise ValueError(f"std schedule: unknown shape {self.shape!r}")

    def __call__(self, env_steps: int | float) -> float:
        f = min(max(float(env_steps) / self.horizon, 0.0), 1.0)
        if self.shape == "linear":
            return self.start + (self.end - self.start) * f
        if self.shape == "exponential":
            return self.start * (self.end / self.start) ** f
        return self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * f))


DEFAULT_STD_SCHEDULE = StdSchedule()  # the defaults of DARPConfig, `darp train` and the sweep's default trial
