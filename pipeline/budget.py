"""Training sized by wall-clock time: ``train.time_budget_s``.

The run measures its own speed, then fixes how many optimizer steps fit in the budget, so that the
linear-to-zero learning rate reaches zero when the budget ends. The clock starts when the trainer
is built (worker start-up, set-up, evaluation and checkpoints all count); rank 0 times
``probe_steps`` steps after ``warmup_steps`` (the first steps pay for oneDNN's kernel choice, the
allocator and the loader's start), estimates one epoch-end evaluation + checkpoint, and plans

    elapsed + (total_steps - steps_done) x step_s + epochs x eval_s  <=  budget_s

The epoch count stays the configured ``train.epochs`` and ``batches_per_epoch`` is derived: ASHA's
rungs (and ``max_t``) are epochs, fixed when the Tuner is built, before any trial has measured
anything, and a fixed epoch count keeps the number of evaluations (a fixed cost) known up front.
The plan is made once (rank 0's, broadcast to every rank) and stored in every checkpoint: a
resumed run keeps it, so its schedule is the one it started with.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

_UNITS = {"h": 3600.0, "m": 60.0, "min": 60.0, "s": 1.0}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(h|min|m|s)")


def parse_duration(value: float | int | str) -> float:
    """Seconds from a number (``7200``) or a string with units: ``"2h"``, ``"90m"``, ``"1h30m"``,
    ``"45s"``, ``"7200"``. Raises ValueError for anything else, or for a duration that is not positive."""
    if isinstance(value, bool):
        raise ValueError(f"a duration (seconds, or a string like '2h', '90m', '1h30m'), got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = str(value).strip().lower()
        try:
            seconds = float(text)
        except ValueError:
            parts = _PART.findall(text)
            if not parts or _PART.sub("", text).strip():
                raise ValueError(f"a duration (seconds, or a string like '2h', '90m', '1h30m'), got {value!r}") from None
            seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if not seconds > 0 or math.isinf(seconds):
        raise ValueError(f"a positive duration, got {value!r}")
    return seconds


def format_duration(seconds: float) -> str:
    """``95.3`` -> ``"1m35s"``; ``7260`` -> ``"2h01m"``; negative -> ``"-12s"``."""
    sign, s = ("-" if seconds < 0 else ""), abs(int(round(seconds)))
    if s >= 3600:
        return f"{sign}{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{sign}{s // 60}m{s % 60:02d}s"
    return f"{sign}{s}s"


@dataclass(frozen=True)
class StepPlan:
    """The steps a budgeted run takes, and the figures they were derived from."""

    budget_s: float
    epochs: int
    batches_per_epoch: int
    step_s: float  # one optimizer step, data included, as measured (all ranks together under DDP)
    pairs_per_s: float  # batch_size x world_size / step_s
    eval_s: float  # one epoch-end evaluation + checkpoint, estimated
    elapsed_s: float  # of the budget, when the plan was made
    steps_done: int  # steps already taken in the first epoch when the plan was made

    @property
    def total_steps(self) -> int:
        return self.epochs * self.batches_per_epoch

    @property
    def fits(self) -> bool:
        """False when even the shortest plan (the steps already taken) runs over the budget."""
        return self.projected_s <= self.budget_s

    @property
    def projected_s(self) -> float:
        """Where the plan says the run ends, on the budget's clock."""
        return self.elapsed_s + (self.total_steps - self.steps_done) * self.step_s + self.epochs * self.eval_s

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StepPlan":
        return cls(**d)

    def mlflow_metrics(self) -> dict[str, float]:
        """What MLflow records about the plan (as metrics: a re-planned run after a restart before
        its first checkpoint logs new values, which params would refuse)."""
        return {"plan/budget_s": self.budget_s, "plan/total_steps": self.total_steps,
                "plan/batches_per_epoch": self.batches_per_epoch, "plan/epochs": self.epochs,
                "plan/pairs_per_s": self.pairs_per_s, "plan/step_s": self.step_s, "plan/eval_s": self.eval_s,
                "plan/elapsed_s": self.elapsed_s, "plan/projected_s": self.projected_s}


def plan_steps(*, budget_s: float, elapsed_s: float, steps_done: int, step_s: float, eval_s: float, epochs: int,
               pairs_per_step: int) -> StepPlan:
    """The most steps that fit: ``total = epochs x batches_per_epoch`` with
    ``elapsed + (total - steps_done) x step_s + epochs x eval_s <= budget``. At least the steps
    already taken (they are part of the first epoch) and at least one per epoch, even when that
    runs over the budget (``StepPlan.fits`` says so)."""
    if step_s <= 0:
        raise ValueError(f"step_s must be positive, got {step_s}")
    left_for_steps = budget_s - elapsed_s - epochs * eval_s
    total = steps_done + max(0, math.floor(left_for_steps / step_s + 1e-9))
    batches = max(total // epochs, steps_done, 1)
    return StepPlan(budget_s=budget_s, epochs=epochs, batches_per_epoch=batches, step_s=step_s,
                    pairs_per_s=pairs_per_step / step_s, eval_s=eval_s, elapsed_s=elapsed_s, steps_done=steps_done)


class StepTimer:
    """Times optimizer steps on a clock (``time.time`` in training, a fake one in tests): the time
    at the end of step ``warmup`` and of step ``warmup + probe``. ``step_done(n)`` after the n-th
    step returns True once the probe is complete; ``step_s`` is then the mean step time over it."""

    def __init__(self, warmup_steps: int, probe_steps: int, clock: Callable[[], float] = time.time) -> None:
        self.warmup, self.probe, self.clock = warmup_steps, probe_steps, clock
        self._t0: float | None = None
        self.step_s: float | None = None

    def start(self) -> None:
        """Before the first step: with no warm-up, the probe times from here."""
        if self.warmup == 0:
            self._t0 = self.clock()

    def step_done(self, steps: int) -> bool:
        if self.step_s is not None:
            return True
        if steps == self.warmup:
            self._t0 = self.clock()
        elif steps == self.warmup + self.probe and self._t0 is not None:
            self.step_s = (self.clock() - self._t0) / self.probe
            return True
        return False
