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

A few probe steps are a small sample: other load on the machine at that moment (seen: a one-minute
job beside a 45-minute run, 101 pairs/s probed against ~225 afterwards) would size the whole run.
So every later epoch starts with a re-plan of the epochs left, from the step time measured over
the whole previous epoch and the epoch-end time actually spent:

    elapsed + epochs_left x (batches_per_epoch x step_s + eval_s)  <=  budget_s

and the linear-to-zero learning rate goes on from the value it had, to zero at the new last step
(``StepPlan.lr_scale``): no jump. Each plan is rank 0's, broadcast to every rank, and stored in
every checkpoint; a resumed run re-plans from it at its next epoch like any other run.
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
    steps_done: int  # steps already taken when the plan was made
    # 0: the first plan, made inside the first epoch, sizes every epoch (that one included);
    # k > 0: a re-plan at the start of epoch k+1 sizes the epochs left.
    epochs_done: int = 0
    # The linear-to-zero schedule starts from lr_start_scale x base lr at lr_start_step (1.0 at step 0
    # for the first plan; for a re-plan, where the previous plan's schedule had got to).
    lr_start_step: int = 0
    lr_start_scale: float = 1.0

    @property
    def total_steps(self) -> int:
        before = self.steps_done if self.epochs_done else 0
        return before + (self.epochs - self.epochs_done) * self.batches_per_epoch

    def lr_scale(self, step: int) -> float:
        """The linear-to-zero factor at ``step``: ``lr_start_scale`` at ``lr_start_step``, 0 at ``total_steps``."""
        span = self.total_steps - self.lr_start_step
        return self.lr_start_scale * min(1.0, max(0.0, (self.total_steps - step) / span)) if span > 0 else 0.0

    @property
    def fits(self) -> bool:
        """False when even the shortest plan (the steps already taken) runs over the budget."""
        return self.projected_s <= self.budget_s + 1e-6  # plan_steps' floor allows rounding's 1e-9 per step

    @property
    def projected_s(self) -> float:
        """Where the plan says the run ends, on the budget's clock."""
        return (self.elapsed_s + (self.total_steps - self.steps_done) * self.step_s
                + (self.epochs - self.epochs_done) * self.eval_s)

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
                "plan/elapsed_s": self.elapsed_s, "plan/projected_s": self.projected_s,
                "plan/epochs_done": self.epochs_done, "plan/lr_start_step": self.lr_start_step,
                "plan/lr_start_scale": self.lr_start_scale}


def plan_steps(*, budget_s: float, elapsed_s: float, steps_done: int, step_s: float, eval_s: float, epochs: int,
               pairs_per_step: int, epochs_done: int = 0, lr_start_step: int = 0, lr_start_scale: float = 1.0) -> StepPlan:
    """The most steps that fit in the epochs left (``epochs - epochs_done``), each of them
    ``batches_per_epoch`` long, with ``projected_s <= budget``. The first plan (``epochs_done=0``,
    made inside the first epoch) keeps at least the steps already taken as the first epoch; every
    plan keeps at least one step per epoch, even when that runs over the budget (``StepPlan.fits``
    says so)."""
    if step_s <= 0:
        raise ValueError(f"step_s must be positive, got {step_s}")
    if not 0 <= epochs_done < epochs:
        raise ValueError(f"epochs_done must be in [0, {epochs}), got {epochs_done}")
    epochs_left = epochs - epochs_done
    new_steps = max(0, math.floor((budget_s - elapsed_s - epochs_left * eval_s) / step_s + 1e-9))
    if epochs_done == 0:
        batches = max((steps_done + new_steps) // epochs, steps_done, 1)
    else:
        batches = max(new_steps // epochs_left, 1)
    return StepPlan(budget_s=budget_s, epochs=epochs, batches_per_epoch=batches, step_s=step_s,
                    pairs_per_s=pairs_per_step / step_s, eval_s=eval_s, elapsed_s=elapsed_s, steps_done=steps_done,
                    epochs_done=epochs_done, lr_start_step=lr_start_step, lr_start_scale=lr_start_scale)


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
