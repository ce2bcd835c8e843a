"""Every device-dependent choice lives here, so the CPU path that CI runs and the GPU path that
production runs differ in one place only."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DevicePlan:
    device: torch.device
    ddp_backend: str  # Ray Train's TorchConfig backend
    amp_dtype: torch.dtype | None  # autocast dtype, None = full precision
    channels_last: bool
    # Inference batch: large on a GPU; on a CPU a batch of 128 patches keeps the activations in
    # cache: 1.1-1.9x faster than 1024 for every architecture on 1 and 2 threads
    # (benchmarks/cpu_eval.py; HardNet, 4000 patches, one core: 2.4 s against 4.1 s).
    eval_batch_size: int = 1024

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self) -> contextlib.AbstractContextManager:
        """Training forward passes."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def eval_autocast(self) -> contextlib.AbstractContextManager:
        """Evaluation: bf16 on a GPU (throughput), fp32 on a CPU, so that FPR95 figures taken on
        different CPUs (with or without AMX) are comparable and match reference implementations."""
        return self.autocast() if self.is_cuda else contextlib.nullcontext()

    def prepare_batch(self, patches_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 (B,1,P,P) -> float in [0,1] on the device. The conversion happens after batching
        and after the copy, so the host moves 1 byte per pixel instead of 4."""
        x = patches_uint8.to(self.device, non_blocking=self.is_cuda).float().div_(255.0)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x


def cpu_has_amx() -> bool:
    """Intel AMX tiles (Sapphire Rapids and later): oneDNN runs bf16 convolutions on them."""
    try:
        return bool(torch.cpu._is_amx_tile_supported())
    except AttributeError:  # an older torch without the probe
        return False


def plan_for(use_gpu: bool, device: torch.device | None = None) -> DevicePlan:
    """GPU: NCCL, bf16 autocast, channels_last. CPU: gloo, channels_last (oneDNN's preferred
    layout), bf16 autocast only with AMX. Measured on a 2-core Xeon with AMX, HardNet training at
    batch 256: fp32 201 pairs/s, channels_last 294, bf16 + channels_last 610 (benchmarks/cpu_train.py);
    without AMX, bf16 is emulated and slower than fp32."""
    if use_gpu:
        return DevicePlan(device or torch.device("cuda"), "nccl", torch.bfloat16, True)
    return DevicePlan(device or torch.device("cpu"), "gloo", torch.bfloat16 if cpu_has_amx() else None, True, eval_batch_size=128)


def gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0
