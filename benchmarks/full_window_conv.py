"""The towers' last layer as a convolution (``nn.Conv2d``, 8x8 kernel over 8x8 maps) against the same
layer as a GEMM (``pipeline.models.hardnet.FullWindowConv``), side by side in one process: the
layer alone (forward + backward at batch 256 = 128 pairs) and whole training steps of each tower
that has it (the training loop's ``PairObjective`` forward, backward and SGD step, with this CPU's
``pipeline.device`` plan: channels_last, bf16 autocast on AMX).

    .venv/bin/python benchmarks/full_window_conv.py [--threads 2] [--rounds 3] [--steps 5]

Rounds alternate the two variants (A B A B ...) so that a neighbour's load hits both; the table shows
the median over rounds of each variant's wall time per step and the ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import yaml

from pipeline.config import LossConfig
from pipeline.device import plan_for
from pipeline.models import create_model
from pipeline.models.hardnet import FullWindowConv
from pipeline.objectives import PairObjective

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOWERS = ("hardnet", "hardnet8", "l2net", "sosnet")


def as_convolution(model: torch.nn.Module) -> torch.nn.Module:
    """The same model with every FullWindowConv replaced by an nn.Conv2d holding the same weights."""
    for name, child in model.named_children():
        if isinstance(child, FullWindowConv):
            conv = torch.nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size, bias=False)
            conv.weight = child.weight
            setattr(model, name, conv)
        else:
            as_convolution(child)
    return model


def timed(fn, steps: int) -> float:
    """Seconds per call, after one untimed call (oneDNN's kernel choice, the allocator)."""
    fn()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t0) / steps


def layer_step(layer: torch.nn.Module, cin: int, channels_last: bool):
    x = torch.randn(256, cin, 8, 8, requires_grad=True)
    if channels_last:
        x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
        layer = layer.to(memory_format=torch.channels_last)
    return lambda: layer(x).sum().backward()


def train_step(arch: str, gemm: bool):
    base = yaml.safe_load(open(os.path.join(ROOT, "configs", "models", f"{arch}.yaml")))
    options = dict(base["model"])
    torch.manual_seed(0)
    model = create_model(options.pop("arch"), **options)
    if not gemm:
        model = as_convolution(model)
    plan = plan_for(False, torch.device("cpu"))
    if plan.channels_last:
        model = model.to(memory_format=torch.channels_last)
    objective = PairObjective(model, arch, LossConfig(**base["loss"]), torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    batch = torch.randint(0, 256, (256, 1, 32, 32), dtype=torch.uint8)  # 128 pairs

    def step() -> None:
        with plan.autocast():
            loss = objective(plan.prepare_batch(batch))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant and round")
    parser.add_argument("--archs", nargs="*", default=list(TOWERS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    plan = plan_for(False, torch.device("cpu"))
    print(f"torch {torch.__version__}, {args.threads} threads, CPU tier {plan.cpu_tier} "
          f"(autocast {plan.amp_dtype}, channels_last {plan.channels_last}); medians over {args.rounds} rounds")

    cases = {}
    for cin, cout in ((128, 128), (256, 512)):
        weight = torch.nn.Conv2d(cin, cout, 8, bias=False).weight
        conv, gemm = torch.nn.Conv2d(cin, cout, 8, bias=False), FullWindowConv(cin, cout, 8, bias=False)
        conv.weight, gemm.weight = weight, weight
        cases[f"layer {cin}->{cout}, fwd+bwd, batch 256"] = (layer_step(conv, cin, plan.channels_last),
                                                             layer_step(gemm, cin, plan.channels_last), 256)
    for arch in args.archs:
        cases[f"{arch} training step, 128 pairs"] = (train_step(arch, gemm=False), train_step(arch, gemm=True), 128)

    print(f"{'case':<40} {'conv ms':>9} {'GEMM ms':>9} {'speed-up':>9} {'pairs/s conv -> GEMM':>22}")
    for name, (conv_fn, gemm_fn, n) in cases.items():
        times = {"conv": [], "gemm": []}
        for r in range(args.rounds):
            order = (("conv", conv_fn), ("gemm", gemm_fn)) if r % 2 == 0 else (("gemm", gemm_fn), ("conv", conv_fn))
            for variant, fn in order:
                times[variant].append(timed(fn, args.steps))
        c, g = statistics.median(times["conv"]), statistics.median(times["gemm"])
        rate = f"{128 / c:.0f} -> {128 / g:.0f}" if n == 128 else ""
        print(f"{name:<40} {c * 1000:>9.0f} {g * 1000:>9.0f} {c / g:>8.2f}x {rate:>22}", flush=True)


if __name__ == "__main__":
    main()
