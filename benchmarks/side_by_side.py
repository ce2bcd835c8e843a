"""One training run with every CPU's thread against one 1-thread run per CPU side by side: the choice
behind ``benchmarks/zoo.py --parallel``. Each variant is child processes doing the training loop's
step (``full_window_conv.train_step``: ``PairObjective`` forward, backward, SGD at 128 pairs, this
CPU's ``pipeline.device`` plan) on random patches; the figure is pairs per second over the whole
machine (the sum over the side-by-side processes).

    .venv/bin/python benchmarks/side_by_side.py [--archs hardnet hardnet8 matchnet] [--rounds 3] [--steps 10]

Rounds alternate the variants (A B A B ...) so that a neighbour's load hits both; the table shows
medians over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def child(arch: str, threads: int, steps: int) -> None:
    import torch

    torch.set_num_threads(threads)
    from full_window_conv import train_step  # this folder is on sys.path: the script's own

    step = train_step(arch, gemm=True)
    step()  # untimed: oneDNN's kernel choice, the allocator
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    print(json.dumps({"pairs_per_s": 128 * steps / (time.perf_counter() - t0)}))


def run(arch: str, processes: int, threads: int, steps: int) -> float:
    """Pairs/s of ``processes`` children with ``threads`` threads each, started together."""
    cmd = [sys.executable, __file__, "--child", arch, "--threads", str(threads), "--steps", str(steps)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(processes)]
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"a child for {arch} failed: {outs}")
    return sum(json.loads(o.strip().splitlines()[-1])["pairs_per_s"] for o in outs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="*", default=["hardnet", "hardnet8", "matchnet"])
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per child")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.threads, args.steps)
        return
    n = args.cpus
    variants = {f"1 run x {n} threads": (1, n), f"{n} runs x 1 thread": (n, 1)}
    print(f"{n} CPUs; pairs/s over the machine, medians over {args.rounds} rounds of {args.steps} steps per child")
    print(f"{'architecture':<14} " + " ".join(f"{v:>22}" for v in variants) + f" {'ratio':>7}")
    for arch in args.archs:
        rates: dict[str, list[float]] = {v: [] for v in variants}
        for r in range(args.rounds):
            for v in (list(variants) if r % 2 == 0 else list(reversed(variants))):
                rates[v].append(run(arch, *variants[v], args.steps))
        one, many = (statistics.median(rates[v]) for v in variants)
        print(f"{arch:<14} {one:>22.0f} {many:>22.0f} {many / one:>6.2f}x", flush=True)


if __name__ == "__main__":
    main()
