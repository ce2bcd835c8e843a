"""Where a HardNet training step's time goes on this CPU, natively and with the ISA capped at AVX2.

    .venv/bin/python benchmarks/cpu_step.py [--rounds 3] [--isa native,avx2] [--threads 1,2] [--batch 128,256]
    .venv/bin/python benchmarks/cpu_step.py --compile [--rounds 3]    # torch.compile: first call and steady step

Each step is the training loop's (pipeline/train.py): a batch from the real stream
(``pipeline.data.stream.train_loader`` over real shards), ``fliprot`` on the uint8 pairs, the uint8
-> float conversion (``DevicePlan.prepare_batch``), optionally the jitter (``make_jitter(10, 0.1)``,
off in the shipped configs), forward of ``PairObjective`` (HardNet + hardest-in-batch loss),
backward, SGD step; each part is timed on its own (CPU work is synchronous). Settings compared:
channels_last vs contiguous, oneDNN on/off (``torch.backends.mkldnn``), 1 and 2 threads, batch
128 and 256.

"avx2" runs the child processes with ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
MKL_ENABLE_INSTRUCTIONS=AVX2`` (ATen's, oneDNN's and MKL's kernels, and inductor's generated code,
all capped at AVX2): an AVX-512 machine standing in for an AVX2-only one. Each child checks that the
cap took (torch's capability, oneDNN's ISA). The machine is shared, so rounds alternate ISAs and
settings (A B A B ...) and the tables show medians over rounds, with the spread (max/min) of the
step time so the noise is visible.

Without ``--shards`` the shards are generated once (``generate_synthetic`` on the tests' two small
photographs per split) into a cache folder under the system temp dir.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ISA_ENV = {
    "native": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
}
PARTS = ("stream", "fliprot", "convert", "jitter", "forward", "backward", "optimizer")
STEP_PARTS = ("stream", "fliprot", "convert", "forward", "backward", "optimizer")  # jitter is off by default


def bench_shards(folder: str | None = None, train_pairs: int = 16384) -> Path:
    """Real shards for the benchmarks: ``folder`` as given, else generated once (2 small photographs
    per split, 256 pairs per block, 2 blocks per shard) and cached."""
    if folder:
        return Path(folder).resolve()
    out = Path(tempfile.gettempdir()) / f"patchflow-bench-shards-{train_pairs}"
    if not (out / "manifest.json").exists():
        sys.path.insert(0, str(ROOT / "tests"))
        from helpers import FEW_IMAGES

        from pipeline.data.synthetic import generate_synthetic

        generate_synthetic(out, train_pairs=train_pairs, eval_pairs=2048, pairs_per_block=256, blocks_per_shard=2,
                           seed=0, images=FEW_IMAGES, progress=False)
    return out


def cpu_line() -> str:
    """``lscpu``'s model name and the flags that decide the CPU plan."""
    import torch

    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")), []))
    shown = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16") if f in flags]
    return f"{model}, {os.cpu_count()} CPUs, flags: {' '.join(shown)}; torch {torch.__version__}"


_PROBE = """
import torch
conv = torch.nn.Conv2d(1, 8, 3).to(memory_format=torch.channels_last)
conv(torch.rand(4, 1, 16, 16).contiguous(memory_format=torch.channels_last)).sum().backward()
print("torch capability", torch.backends.cpu.get_cpu_capability())
"""


def check_isa(isa: str) -> str:
    """What the kernels really are under ``ISA_ENV[isa]``: torch's dispatch capability, oneDNN's
    ISA and the convolution kernels it ran (ONEDNN_VERBOSE), MKL's code path (MKL_VERBOSE).
    Exits when the avx2 cap did not take."""
    env = {**os.environ, **ISA_ENV[isa], "ONEDNN_VERBOSE": "1", "MKL_VERBOSE": "1"}
    code = _PROBE + "torch.rand(64, 64) @ torch.rand(64, 64)\n"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    cap = next((l.split()[-1] for l in out.splitlines() if l.startswith("torch capability")), "?")
    onednn = next((l.split("isa:", 1)[1] for l in out.splitlines() if ",isa:" in l), "?")
    kernels = sorted({l.split(",")[6] for l in out.splitlines() if ",exec,cpu,convolution," in l})
    mkl = next((l for l in out.splitlines() if l.startswith("MKL_VERBOSE oneMKL")), "")
    mkl = "AVX-512" if "AVX-512" in mkl else "AVX2" if "AVX2" in mkl else "?"
    if isa == "avx2" and (cap != "AVX2" or "AVX-512" in onednn or any("avx512" in k for k in kernels)):
        raise SystemExit(f"the AVX2 cap did not take: torch {cap}, oneDNN {onednn}, kernels {kernels}")
    return f"{isa}: torch capability {cap}; oneDNN ISA {onednn}, conv kernels {', '.join(kernels)}; MKL {mkl}"


def _objective(channels_last: bool):
    import torch

    from pipeline.config import LossConfig
    from pipeline.models import create_model
    from pipeline.objectives import PairObjective

    torch.manual_seed(0)
    model = create_model("hardnet")
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    objective = PairObjective(model, "hardnet", LossConfig(), torch.Generator().manual_seed(0)).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    return objective, optimizer


def _loader(shards: Path, batch: int, n: int, epoch: int = 0):
    from pipeline.data.shards import shard_paths
    from pipeline.data.stream import train_loader

    return train_loader(shard_paths(shards, "train"), rank=0, world_size=1, epoch=epoch, batch_size=batch,
                        batches_per_epoch=n, shuffle_buffer=4096, seed=0)


def time_steps(shards: Path, *, batch: int, threads: int, channels_last: bool, mkldnn: bool, steps: int,
               warmup: int = 2, compiled: bool = False) -> dict:
    """Median wall seconds per part over ``steps`` training steps (after ``warmup``), and the median
    CPU seconds of the process per step (jitter left out). With one thread, CPU time is what the step
    would take on an idle core: it does not grow when other jobs take the CPU, wall time does."""
    import torch

    from pipeline.augment import fliprot, make_jitter
    from pipeline.device import DevicePlan

    torch.set_num_threads(threads)
    torch.backends.mkldnn.enabled = mkldnn
    plan = DevicePlan(torch.device("cpu"), "gloo", None, channels_last)
    objective, optimizer = _objective(channels_last)
    forward = torch.compile(objective) if compiled else objective
    jitter = make_jitter(10.0, 0.1)
    rng = torch.Generator().manual_seed(1)
    wall: dict[str, list[float]] = {p: [] for p in PARTS}
    cpu: list[float] = []
    first_step = None
    it = iter(_loader(shards, batch, warmup + steps))

    def mark() -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    for i in range(warmup + steps):
        t = [mark()]
        pairs = next(it)["pairs"]
        t.append(mark())
        pairs = fliprot(pairs, rng)
        t.append(mark())
        b, _, p, _ = pairs.shape
        x = plan.prepare_batch(pairs.reshape(b * 2, 1, p, p))
        t.append(mark())
        jitter(x)  # timed, not used: the shipped configs train without it
        t.append(mark())
        loss = forward(x)
        t.append(mark())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t.append(mark())
        optimizer.step()
        loss.item()
        t.append(mark())
        if i == 0:
            first_step = t[-1][0] - t[0][0], t[-1][1] - t[0][1]
        if i >= warmup:
            for name, a, z in zip(PARTS, t, t[1:]):
                wall[name].append(z[0] - a[0])
            cpu.append(sum(z[1] - a[1] for name, a, z in zip(PARTS, t, t[1:]) if name in STEP_PARTS))
    torch.backends.mkldnn.enabled = True
    out = {p: statistics.median(v) for p, v in wall.items()}
    out["step"] = statistics.median(sum(wall[p][i] for p in STEP_PARTS) for i in range(steps))
    out["cpu"] = statistics.median(cpu)
    out["first_step"], out["first_step_cpu"] = first_step
    return out


def settings(threads: list[int], batches: list[int]) -> list[dict]:
    """channels_last / contiguous x oneDNN on / off; oneDNN off only at the fewest threads (it lost
    1.4-2.8x there, and every setting costs minutes on a shared 2-core machine)."""
    return [{"threads": t, "batch": b, "channels_last": cl, "mkldnn": mk}
            for t in threads for b in batches for cl in (True, False) for mk in (True, False)
            if mk or t == min(threads)]


def child(args: argparse.Namespace) -> None:
    import torch

    if args.child == "avx2" and torch.backends.cpu.get_cpu_capability() != "AVX2":
        raise SystemExit("ATEN_CPU_CAPABILITY=avx2 did not take in the child")
    shards = bench_shards(args.shards)
    if args.compile:
        todo = [{"threads": t, "batch": b, "channels_last": True, "mkldnn": True, "compiled": c}
                for t in args.threads for b in args.batch for c in (False, True)]
    else:
        todo = settings(args.threads, args.batch)
    if args.round % 2:  # alternate the order within a child too
        todo = todo[::-1]
    for s in todo:
        r = time_steps(shards, steps=args.steps, **s)
        print(json.dumps({"isa": args.child, "round": args.round, **s, **r}), flush=True)


def key(r: dict) -> tuple:
    return (r["isa"], r["threads"], r["batch"], r["channels_last"], r["mkldnn"], r.get("compiled", False))


def report(rows: list[dict]) -> None:
    """Medians over rounds. step = the parts the training loop runs (jitter left out); CPU = the
    process's CPU time per step (= the time on an idle core at 1 thread)."""
    compile_mode = any("compiled" in r for r in rows)
    groups: dict[tuple, list[dict]] = {}
    for r in sorted(rows, key=key):
        groups.setdefault(key(r), []).append(r)
    header = ("| ISA | threads | batch | layout | oneDNN |" + (" compiled | first step s (CPU s) |" if compile_mode else "")
              + "".join(f" {p} ms |" for p in PARTS) + " step ms (max/min) | CPU ms/step | pairs/s (wall) | pairs/s (CPU, 1 thread) |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for k, rs in groups.items():
        med = {p: statistics.median(r[p] for r in rs) * 1e3 for p in PARTS}
        step = [r["step"] for r in rs]
        step_ms, cpu_ms = statistics.median(step) * 1e3, statistics.median(r["cpu"] for r in rs) * 1e3
        isa, threads, batch, cl, mk, compiled = k
        extra = (f" {compiled} | {statistics.median(r['first_step'] for r in rs):.1f} "
                 f"({statistics.median(r.get('first_step_cpu', math.nan) for r in rs):.1f}) |") if compile_mode else ""
        per_cpu = f"{batch / (cpu_ms / 1e3):.0f}" if threads == 1 else "-"
        print(f"| {isa} | {threads} | {batch} | {'channels_last' if cl else 'contiguous'} | {'on' if mk else 'off'} |{extra}"
              + "".join(f" {med[p]:.1f} |" for p in PARTS)
              + f" {step_ms:.0f} ({max(step) / min(step):.2f}x, n={len(rs)}) | {cpu_ms:.0f} | {batch / (step_ms / 1e3):.0f} | {per_cpu} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--isa", default="native,avx2", help="comma list of: " + ", ".join(ISA_ENV))
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--batch", default="128,256")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per setting and round")
    parser.add_argument("--compile", action="store_true", help="eager vs torch.compile (channels_last, oneDNN on)")
    parser.add_argument("--shards", help="shard folder (default: generated once into the temp dir)")
    parser.add_argument("--log", help="append every measurement to this JSON-lines file (default: one in the temp dir)")
    parser.add_argument("--report", metavar="LOG", help="print the tables of an earlier run's log and exit")
    parser.add_argument("--child", choices=list(ISA_ENV), help=argparse.SUPPRESS)
    parser.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.threads = [int(t) for t in args.threads.split(",")]
    args.batch = [int(b) for b in args.batch.split(",")]
    if args.child:
        return child(args)
    if args.report:
        return report([json.loads(line) for line in open(args.report)])

    shards = bench_shards(args.shards)
    log_path = Path(args.log or Path(tempfile.gettempdir()) / f"cpu_step-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
    print(f"measurements go to {log_path} (tables again: --report {log_path})", flush=True)
    print(cpu_line(), flush=True)
    for isa in args.isa.split(","):
        print(check_isa(isa), flush=True)
    rows: list[dict] = []
    isas = args.isa.split(",")
    for rnd in range(args.rounds):
        for isa in (isas if rnd % 2 == 0 else isas[::-1]):
            cmd = [sys.executable, __file__, "--child", isa, "--round", str(rnd), "--shards", str(shards),
                   "--threads", ",".join(map(str, args.threads)), "--batch", ",".join(map(str, args.batch)),
                   "--steps", str(args.steps)] + (["--compile"] if args.compile else [])
            proc = subprocess.Popen(cmd, env={**os.environ, **ISA_ENV[isa]}, stdout=subprocess.PIPE, text=True)
            with open(log_path, "a") as log:
                for line in proc.stdout:  # kept as they come: a long run stopped early still has its rounds
                    rows.append(json.loads(line))
                    log.write(line)
                    log.flush()
            if rc := proc.wait():  # a negative code is the signal that ended it (OOM killer: -9)
                raise SystemExit(f"child {isa} failed with exit code {rc} (its stderr is above)")
            print(f"round {rnd + 1}/{args.rounds} {isa} done", file=sys.stderr, flush=True)
    report(rows)


if __name__ == "__main__":
    main()
