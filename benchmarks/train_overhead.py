"""Ray Train against a bare PyTorch loop: same model, data, threads and steps, side by side in one run.

    .venv/bin/python benchmarks/train_overhead.py [--rounds 2] [--epochs 3] [--steps 30] [--batch 128]
        [--variants bare-1x2,ray-1x2,bare-1x1,ray-1x1,bare-2x1,ray-2x1] [--shards DIR]

Variants are ``KIND-WORKERSxTHREADS``. ``bare`` is a plain PyTorch loop in fresh processes (one per
rank; 2 ranks: torch.distributed gloo + DDP on localhost), doing what
``pipeline.train.train_loop_per_worker`` does for the same config: the same stream
(``train_loader`` over real shards), ``fliprot``, ``DevicePlan.prepare_batch``, ``PairObjective``
(HardNet, hardest-in-batch), SGD with the linear schedule, and every epoch FPR95 on the eval
pairs on rank 0. ``ray`` is ``pipeline.train.build_trainer`` on a local Ray cluster (started per
round with ``pipeline.cluster.init_ray``, the way ``patchflow train`` starts it), so it adds what a
real run adds: Ray's worker processes and daemons, the per-epoch MLflow log, checkpoint and
``ray.train.report``.

Printed per variant, medians over rounds (the machine is shared: rounds alternate the order):
- step pairs/s: pairs over the time of the epoch's training steps (the loop's own ``pairs_per_s``)
- epoch pairs/s: pairs over the wall time from one epoch's end to the next (eval, checkpoint,
  report and logging included; epoch 1 left out: it holds the start-up)
- the ratio of each to the bare loop of the same shape (target: Ray >= 0.95x)
- CPU ms/step: rank 0's process CPU time per training step (``StepClock``: its Ray background
  threads included), the figure that does not depend on the machine's load; its "x bare" is
  Ray's CPU over the bare loop's (1.0 = no overhead in the worker; > 1 = Ray costs CPU there)
- fit s: the whole run, Ray start-up of the workers included (the cluster itself is already up)
and, for Ray runs, where CPU time went during ``fit()`` (from /proc, this run's processes only: the
training worker, the Train controller, raylet / GCS / dashboard and the other Ray processes) and the
worker process's thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_step import bench_shards, cpu_line  # noqa: E402

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def make_config(shards: Path, tmp: Path, *, workers: int, threads: int, epochs: int, steps: int, batch: int,
                eval_pairs: int):
    from pipeline.config import Config

    return Config.model_validate({
        "data": {"shards": str(shards), "eval_pairs": eval_pairs, "shuffle_buffer": 4096},
        "model": {"arch": "hardnet", "dropout": 0.3},
        "train": {"epochs": epochs, "batch_size": batch, "batches_per_epoch": steps, "lr": 0.1, "torch_threads": threads},
        "scaling": {"num_workers": workers, "cpus_per_worker": threads},
        "run": {"storage_path": str(tmp / "runs")},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": "overhead"},
    })


# ---------------------------------------------------------------- CPU time per step, in both loops

class StepClock:
    """The process's CPU seconds at the start of every batch, per epoch, written to ``folder`` at the
    end of each epoch. CPU time per step is the load-independent figure on a shared machine: wall
    time there measures the scheduler. Process time, not thread time, so the Ray worker's own
    background threads (core worker, gRPC, the Train V2 report thread) count against Ray."""

    def __init__(self, folder: str) -> None:
        self.folder, self.marks = folder, []

    def on_batch(self, batch=None, *, rank: int = 0) -> None:
        self.marks.append(time.process_time())

    def after_backward(self, **_) -> None:
        pass

    def end_of_epoch(self, *, rank: int, epoch: int, model=None) -> None:
        Path(self.folder, f"clock-rank{rank}-epoch{epoch}.json").write_text(json.dumps(self.marks))
        self.marks = []


def cpu_ms_per_step(folder: Path, rank: int = 0) -> float:
    """Median over epochs of CPU ms per step between the first and the last batch of an epoch."""
    per_epoch = []
    for f in sorted(folder.glob(f"clock-rank{rank}-epoch*.json")):
        marks = json.loads(f.read_text())
        if len(marks) > 1:
            per_epoch.append((marks[-1] - marks[0]) / (len(marks) - 1) * 1e3)
    return statistics.median(per_epoch) if per_epoch else float("nan")


# ---------------------------------------------------------------- the bare loop (one process per rank)

def bare_rank(cfg_json: str, rank: int, world: int, out: str, clock_dir: str) -> None:
    """train_loop_per_worker's work without Ray: what a rank does, timed per epoch."""
    import resource

    import torch
    import torch.distributed as dist

    from pipeline.augment import fliprot
    from pipeline.config import Config
    from pipeline.data.shards import shard_paths
    from pipeline.data.stream import load_eval_split, train_loader
    from pipeline.device import plan_for
    from pipeline.evaluate import evaluate_pairs
    from pipeline.models import create_model
    from pipeline.objectives import PairObjective

    cfg = Config.model_validate_json(cfg_json)
    plan = plan_for(False)
    torch.set_num_threads(cfg.train.torch_threads)
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(cfg.train.seed)
    model = create_model(cfg.model.arch, **cfg.model.factory_kwargs())
    if plan.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.train.lr, momentum=cfg.train.momentum,
                                weight_decay=cfg.train.weight_decay)
    loss_rng = torch.Generator().manual_seed(cfg.train.seed * 7919 + rank)
    objective = PairObjective(model, cfg.model.arch, cfg.loss, loss_rng)
    if world > 1:
        objective = torch.nn.parallel.DistributedDataParallel(objective)
    train_urls = shard_paths(cfg.data.shards, "train")
    if rank == 0:
        eval_pairs, eval_labels, _ = load_eval_split(cfg.data, shard_paths(cfg.data.shards, "eval"))
    augment_rng = torch.Generator()
    clock = StepClock(clock_dir)
    total = cfg.train.epochs * cfg.train.batches_per_epoch
    step, epochs = 0, []
    t_start = time.time()
    for epoch in range(cfg.train.epochs):
        epoch_seed = cfg.train.seed * 1_000_003 + epoch * 1009 + rank
        augment_rng.manual_seed(epoch_seed)
        loss_rng.manual_seed(epoch_seed)
        torch.manual_seed(epoch_seed)
        loader = train_loader(train_urls, loader_workers=0, rank=rank, world_size=world, epoch=epoch,
                              batch_size=cfg.train.batch_size, batches_per_epoch=cfg.train.batches_per_epoch,
                              shuffle_buffer=cfg.data.shuffle_buffer, seed=cfg.train.seed)
        objective.train()
        loss_sum, t0, c0 = 0.0, time.perf_counter(), time.process_time()
        for batch in loader:
            clock.on_batch(batch, rank=rank)
            pairs = fliprot(batch["pairs"], augment_rng)
            b, _, p, _ = pairs.shape
            x = plan.prepare_batch(pairs.reshape(b * 2, 1, p, p))
            for group in optimizer.param_groups:
                group["lr"] = cfg.train.lr * (1.0 - step / total)
            loss = objective(x)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            loss_sum += loss.item()
        seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
        fpr = evaluate_pairs(model, eval_pairs, eval_labels, plan)["eval_fpr95"] if rank == 0 else 0.0
        shared = torch.tensor([loss_sum, fpr, 0.0], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(shared)
        clock.end_of_epoch(rank=rank, epoch=epoch)
        epochs.append({"step_s": seconds, "step_cpu_s": cpu_seconds, "end": time.time(), "fpr": float(shared[1])})
    if world > 1:
        dist.destroy_process_group()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    Path(f"{out}.{rank}").write_text(json.dumps({"epochs": epochs, "start": t_start, "threads": torch.get_num_threads(),
                                                 "interop": torch.get_num_interop_threads(),
                                                 "cpu_s": usage.ru_utime + usage.ru_stime}))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_bare(cfg, workers: int, tmp: Path) -> dict:
    out = tmp / f"bare-{time.time_ns()}.json"
    clock_dir = tmp / out.stem
    clock_dir.mkdir()
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    t0 = time.time()
    procs = [subprocess.Popen([sys.executable, __file__, "--bare-rank", str(r), "--world", str(workers),
                               "--cfg", cfg.model_dump_json(), "--out", str(out), "--clock-dir", str(clock_dir)], env=env)
             for r in range(workers)]
    if any(p.wait() for p in procs):
        raise SystemExit("a bare rank failed")
    elapsed = time.time() - t0
    ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(workers)]
    return summarise(cfg, workers, ranks[0]["epochs"], elapsed, extra={
        "cpu ms/step": cpu_ms_per_step(clock_dir), "torch threads": ranks[0]["threads"], "interop threads": ranks[0]["interop"],
        "cpu s": {"training processes": round(sum(r["cpu_s"] for r in ranks), 1)}})


# ---------------------------------------------------------------- Ray Train

def _proc_cpu() -> dict[int, tuple[str, float]]:
    """pid -> (command line, user+system CPU seconds) of this process and its descendants (/proc):
    the local cluster init_ray started (raylet, GCS, dashboard, workers), not another user's Ray."""
    tick = os.sysconf("SC_CLK_TCK")
    out, parent = {}, {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            out[int(d.name)] = (cmd, (int(fields[11]) + int(fields[12])) / tick)
            parent[int(d.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue

    def ours(pid: int) -> bool:
        while pid > 1:
            if pid == os.getpid():
                return True
            pid = parent.get(pid, 0)
        return False

    return {pid: v for pid, v in out.items() if ours(pid)}


def _ray_group(cmd: str) -> str | None:
    """Which part of Ray a process is, from its (Ray-renamed) command line; None: not Ray's."""
    for needle, group in (("RayTrainWorker", "train worker"), ("TrainController", "train controller"),
                          ("raylet", "raylet"), ("gcs_server", "gcs"), ("dashboard", "dashboard + agents"),
                          ("runtime_env", "dashboard + agents"), ("ray::IDLE", "idle ray workers"),
                          ("default_worker.py", "idle ray workers"), ("ray::", "other ray actors"),
                          ("ray/", "other ray processes")):
        if needle in cmd:
            return group
    return None


def run_ray(cfg, workers: int, tmp: Path) -> dict:
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import get_or_create_experiment
    from pipeline.train import build_trainer

    client = MlflowClient(cfg.mlflow.tracking_uri)
    run_id = client.create_run(get_or_create_experiment(client, cfg.mlflow.experiment)).info.run_id
    clock_dir = tmp / f"ray-{time.time_ns()}"
    clock_dir.mkdir()
    trainer = build_trainer(cfg, name=f"overhead-{time.time_ns()}", tracking_uri=cfg.mlflow.tracking_uri,
                            mlflow_run_id=run_id, hooks=StepClock(str(clock_dir)))
    before = _proc_cpu()
    groups: dict[int, str] = {}  # a process keeps the most specific name it was seen with
    latest: dict[int, float] = {}
    threads: dict[int, int] = {}
    done = threading.Event()

    def sample() -> None:  # workers exit when fit() returns: their CPU time is read while they run
        for pid, (cmd, seconds) in _proc_cpu().items():
            group = _ray_group(cmd) or ("driver" if pid == os.getpid() else None)
            if group is None:
                continue
            if group in ("train worker", "train controller") or pid not in groups:
                groups[pid] = group
            latest[pid] = seconds
            if groups[pid] == "train worker":
                try:
                    status = Path(f"/proc/{pid}/status").read_text()
                    n = int(next(l.split()[1] for l in status.splitlines() if l.startswith("Threads:")))
                    threads[pid] = max(threads.get(pid, 0), n)
                except (OSError, StopIteration, ValueError):
                    pass

    def watch() -> None:
        while not done.wait(1.0):
            sample()

    watcher = threading.Thread(target=watch, daemon=True)
    t0 = time.time()
    watcher.start()
    trainer.fit()
    elapsed = time.time() - t0
    done.set()
    watcher.join()
    sample()
    cpu: dict[str, float] = {}
    for pid, seconds in latest.items():
        group = "training processes" if groups[pid] == "train worker" else groups[pid]
        cpu[group] = cpu.get(group, 0.0) + seconds - before.get(pid, ("", 0.0))[1]
    history = sorted(client.get_metric_history(run_id, "pairs_per_s"), key=lambda m: m.step)
    epochs = [{"step_s": cfg.train.batches_per_epoch * cfg.train.batch_size * workers / m.value, "end": m.timestamp / 1e3}
              for m in history]
    return summarise(cfg, workers, epochs, elapsed, extra={
        "cpu ms/step": cpu_ms_per_step(clock_dir), "worker threads (max)": sorted(threads.values()), "cpu s": {k: round(v, 1) for k, v in sorted(cpu.items())}})


def summarise(cfg, workers: int, epochs: list[dict], elapsed: float, extra: dict) -> dict:
    pairs = cfg.train.batches_per_epoch * cfg.train.batch_size * workers
    step_rates = [pairs / e["step_s"] for e in epochs]
    ends = [e["end"] for e in epochs]
    epoch_rates = [pairs / (b - a) for a, b in zip(ends, ends[1:])]
    return {"step": statistics.median(step_rates), "epoch": statistics.median(epoch_rates) if epoch_rates else float("nan"),
            "fit_s": elapsed, **extra}


# ---------------------------------------------------------------- driver

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30, help="batches per epoch and rank")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--eval-pairs", type=int, default=1000)
    parser.add_argument("--variants", default="bare-1x2,ray-1x2,bare-1x1,ray-1x1,bare-2x1,ray-2x1")
    parser.add_argument("--shards")
    parser.add_argument("--bare-rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--cfg", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--clock-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_rank is not None:
        os.environ.update(RANK=str(args.bare_rank), WORLD_SIZE=str(args.world))
        return bare_rank(args.cfg, args.bare_rank, args.world, args.out, args.clock_dir)

    # A Ray of our own: init_ray joins a `ray start` head recorded in $RAY_TMPDIR/ray/ray_current_cluster
    # (another user's, on a shared machine), whose daemons and load are not what this run measures.
    # A private, short temp dir (Ray's socket paths have a length limit) keeps its record apart.
    os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="pfray-", dir="/tmp"))
    import ray

    from pipeline.cluster import init_ray

    shards = bench_shards(args.shards)
    print(cpu_line(), flush=True)
    variants = [v.split("-") for v in args.variants.split(",")]
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for rnd in range(args.rounds):
            order = variants if rnd % 2 == 0 else variants[::-1]
            for kind, shape in order:
                workers, threads = map(int, shape.split("x"))
                cfg = make_config(shards, tmp, workers=workers, threads=threads, epochs=args.epochs, steps=args.steps,
                                  batch=args.batch, eval_pairs=args.eval_pairs)
                if kind == "ray":
                    init_ray()
                    r = run_ray(cfg, workers, tmp)
                else:
                    if ray.is_initialized():  # the bare loop runs without Ray's daemons on the machine
                        ray.shutdown()
                    r = run_bare(cfg, workers, tmp)
                results.setdefault(f"{kind}-{shape}", []).append(r)
                print(f"round {rnd + 1} {kind}-{shape}: " + json.dumps(r), flush=True)
        if ray.is_initialized():
            ray.shutdown()
    print("\n| variant | step pairs/s (each round) | x bare | epoch pairs/s | x bare | CPU ms/step, rank 0 (each round) | x bare | fit s | CPU s: training processes | CPU s: rest of Ray | rounds |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    med = {v: {k: statistics.median(r[k] for r in rs) for k in ("step", "epoch", "fit_s", "cpu ms/step")}
           for v, rs in results.items()}
    for v, m in med.items():
        bare = med.get("bare-" + v.split("-")[1])
        ratio = (lambda k: f"{m[k] / bare[k]:.3f}") if bare else (lambda k: "-")
        spread = ", ".join(f"{r['step']:.0f}" for r in results[v])
        cpu_spread = ", ".join(f"{r['cpu ms/step']:.0f}" for r in results[v])
        train_cpu = statistics.median(r["cpu s"]["training processes"] for r in results[v])
        rest = statistics.median(sum(c for g, c in r["cpu s"].items() if g not in ("training processes", "driver"))
                                 for r in results[v])
        print(f"| {v} | {m['step']:.0f} ({spread}) | {ratio('step')} | {m['epoch']:.0f} | {ratio('epoch')} "
              f"| {m['cpu ms/step']:.0f} ({cpu_spread}) | {ratio('cpu ms/step')} | {m['fit_s']:.0f} "
              f"| {train_cpu:.0f} | {rest:.0f} | {len(results[v])} |")


if __name__ == "__main__":
    main()
