"""What wall-time ratio to expect from benchmarks/sweep.py, before spending half an hour on it.

    .venv/bin/python benchmarks/asha_sim.py [--trials 16] [--epochs 16] [--reduction-factor 4]

A model of async ASHA as Ray runs it (``ASHAScheduler``: at each rung a trial goes on when its
metric is in the top 1/rf of those recorded at that rung so far, so the first trial at a rung
always goes on), with ``--slots`` trials at a time, one time unit per epoch and ``--fixed`` units
per trial that no scheduler saves (actor and worker start, process group, shutdown; estimated
from a probe sweep's timeline on the 2-core VM at ~20 s, against ~9 s per epoch of 40 x 64
pairs with its eval, so ~2.3 epochs). A trial's rung metrics share a latent quality with
correlation ``--rho``. Prints the share of epochs ASHA runs and the ASHA / full wall-time ratio
over many random orders of the trials: one seeded sweep is one draw from this spread.
"""

from __future__ import annotations

import argparse
import heapq

import numpy as np


def simulate(rng: np.random.Generator, trials: int, max_t: int, rf: int, slots: int, fixed: float, rho: float) -> tuple[float, float]:
    """(share of the full run's epochs that ASHA ran, ASHA wall time / full wall time)."""
    rungs = []
    milestone = 1
    while milestone < max_t:
        rungs.append(milestone)
        milestone *= rf
    quality = rng.normal(size=trials)
    at_rung = {r: rho * quality + np.sqrt(1 - rho**2) * rng.normal(size=trials) for r in rungs}
    recorded: dict[int, list[float]] = {r: [] for r in rungs}
    events = []  # (time, trial, epoch just finished)
    started = 0
    for _ in range(min(slots, trials)):
        heapq.heappush(events, (fixed + 1, started, 1))
        started += 1
    epochs_run, end = 0, 0.0
    while events:
        t, trial, epoch = heapq.heappop(events)
        stop = epoch >= max_t
        if epoch in recorded:
            history = recorded[epoch]
            if history and at_rung[epoch][trial] > np.percentile(history, 100 / rf):  # lower is better
                stop = True
            history.append(at_rung[epoch][trial])
        if not stop:
            heapq.heappush(events, (t + 1, trial, epoch + 1))
            continue
        epochs_run += epoch
        end = max(end, t)
        if started < trials:
            heapq.heappush(events, (t + fixed + 1, started, 1))
            started += 1
    full = np.ceil(trials / slots) * (max_t + fixed)
    return epochs_run / (trials * max_t), end / full


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--reduction-factor", type=int, default=4)
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument("--fixed", type=float, default=2.3, help="per-trial fixed cost, in epochs")
    parser.add_argument("--rho", type=float, default=0.85)
    parser.add_argument("--draws", type=int, default=3000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    runs = np.array([simulate(rng, args.trials, args.epochs, args.reduction_factor, args.slots, args.fixed, args.rho)
                     for _ in range(args.draws)])
    share, ratio = runs[:, 0], runs[:, 1]
    p10, p50, p90 = np.percentile(ratio, [10, 50, 90])
    print(f"{args.trials} trials, max {args.epochs} epochs, rf {args.reduction_factor}, {args.slots} at a time, "
          f"fixed cost {args.fixed} epochs: ASHA runs {share.mean():.2f} of the epochs; wall-time ratio "
          f"median {p50:.2f} (10-90%: {p10:.2f}-{p90:.2f}), above 0.5 in {np.mean(ratio > 0.5):.0%} of orders")


if __name__ == "__main__":
    main()
