"""HardNet training-step throughput on CPU: fp32 vs channels_last vs bf16 autocast, side by side.

    .venv/bin/python benchmarks/cpu_train.py [--threads 2] [--batch 256] [--arch hardnet ...]

Same weights and data for every setting; forward + hardest-in-batch loss on the descriptors + backward
+ SGD step. Decides what ``pipeline.device.plan_for`` does on CPU (bf16 pays with AMX and with AVX512_BF16).
"""

from __future__ import annotations

import argparse
import time

import torch

from pipeline.device import cpu_features
from pipeline.losses import hardest_in_batch_triplet_loss
from pipeline.models import create_model, list_models, model_info


def pairs_per_second(batch: int, channels_last: bool, bf16: bool, steps: int = 8, arch: str = "hardnet") -> float:
    torch.manual_seed(0)
    model = create_model(arch)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    size = model_info(arch).input_size
    x = torch.rand(2 * batch, 1, size, size)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            desc = model(x).float()
        loss = hardest_in_batch_triplet_loss(desc[0::2], desc[1::2])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for _ in range(3):  # warm-up: oneDNN picks its kernels
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=256, help="pairs per step")
    parser.add_argument("--arch", nargs="+", default=["hardnet"], choices=[m for m in list_models() if model_info(m).trainable])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, CPU features {sorted(cpu_features())}", flush=True)
    for arch in args.arch:
        base = None
        for channels_last, bf16 in ((False, False), (True, False), (False, True), (True, True)):
            rate = pairs_per_second(args.batch, channels_last, bf16, arch=arch)
            base = base or rate
            print(f"{arch:9} channels_last={channels_last!s:5} bf16={bf16!s:5}: {rate:6.0f} pairs/s  ({rate / base:.2f}x fp32)",
                  flush=True)


if __name__ == "__main__":
    main()
