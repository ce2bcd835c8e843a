"""Every device-dependent choice lives here, so the CPU path that CI runs and the GPU path that
production runs differ in one place only."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch

CpuTier = Literal["amx", "avx512_bf16", "avx512", "avx2", "baseline"]


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
    cpu_tier: CpuTier | None = None  # the CPU feature set the settings were chosen for (None on a GPU)

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
        different CPUs (with or without bf16 hardware) are comparable and match reference implementations."""
        return self.autocast() if self.is_cuda else contextlib.nullcontext()

    def prepare_batch(self, patches_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 (B,1,P,P) -> float in [0,1] on the device. The conversion happens after batching
        and after the copy, so the host moves 1 byte per pixel instead of 4."""
        x = patches_uint8.to(self.device, non_blocking=self.is_cuda).float().div_(255.0)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x


# oneDNN's ISA cap (ONEDNN_MAX_CPU_ISA) in oneDNN's own order; a cap below a feature hides it from
# the convolutions, so the plan must not count on it (bf16 without AMX kernels is emulated: slow).
_ONEDNN_ISAS = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI",
                "AVX512_CORE_BF16", "AVX10_1_512", "AVX512_CORE_FP16", "AVX10_1_512_AMX", "AVX512_CORE_AMX",
                "AVX10_1_512_AMX_FP16", "AVX512_CORE_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2")


def _onednn_allows(feature: str, cap: str | None) -> bool:
    if not cap or cap.upper() in ("ALL", "DEFAULT") or cap.upper() not in _ONEDNN_ISAS:
        return True
    rank = _ONEDNN_ISAS.index(cap.upper())
    first = {"avx2": "AVX2", "avx512": "AVX512_CORE", "avx512_bf16": "AVX512_CORE_BF16", "amx": "AVX10_1_512_AMX"}[feature]
    return rank >= _ONEDNN_ISAS.index(first) and (feature != "amx" or "AMX" in cap.upper())


def cpu_features() -> frozenset[str]:
    """This process's usable CPU features among avx2, avx512, avx512_bf16, amx: what the CPU has
    (cpuinfo, through torch), less what ATEN_CPU_CAPABILITY or ONEDNN_MAX_CPU_ISA switch off (so an
    AVX-512 machine run with both capped at AVX2 plans like an AVX2 machine)."""
    capability = torch.backends.cpu.get_cpu_capability()  # honours ATEN_CPU_CAPABILITY
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA")
    probes = {
        "avx2": capability in ("AVX2", "AVX512"),
        "avx512": capability == "AVX512",
        "avx512_bf16": capability == "AVX512" and _probe("_is_avx512_bf16_supported"),
        "amx": _probe("_is_amx_tile_supported"),
    }
    return frozenset(f for f, present in probes.items() if present and _onednn_allows(f, cap))


def _probe(name: str) -> bool:
    try:
        return bool(getattr(torch.cpu, name)())
    except AttributeError:  # an older torch without the probe
        return False


def cpu_tier(features: Iterable[str]) -> CpuTier:
    """The feature set the CPU plan is chosen by: the best of amx > avx512_bf16 > avx512 > avx2 > baseline."""
    features = set(features)
    for tier in ("amx", "avx512_bf16", "avx512", "avx2"):
        if tier in features:
            return tier  # type: ignore[return-value]
    return "baseline"


@dataclass(frozen=True)
class CpuSetting:
    amp_dtype: torch.dtype | None
    channels_last: bool


# HardNet training step (forward + hardest-in-batch loss + backward + SGD), per CPU feature set.
# amx: 2-core Xeon (Sapphire Rapids, AMX-BF16), batch 256, 2 threads (benchmarks/cpu_train.py, 2026-11-30):
#   fp32 201 pairs/s, fp32 channels_last 294, bf16 400, bf16 + channels_last 610.
# avx512 / avx2: 2-vCPU Xeon (family 6 model 207; avx2 avx512f avx512_vnni, no avx512_bf16, no AMX),
#   HardNet batch 128, 1 thread, process CPU ms per step (the machine was shared ~10-30 deep, so wall
#   time measured the scheduler), medians of 3 interleaved rounds (benchmarks/cpu_step.py, 2026-12-01):
#   avx512: channels_last 955 ms (134 pairs/s) vs contiguous 1177; oneDNN off 2400 / 2017.
#   avx2 (ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2; oneDNN ran its avx2 jit/brgemm kernels):
#   channels_last 1313 ms (97 pairs/s) vs contiguous 1599; oneDNN off 2179 / 2121.
#   channels_last won in every round on both (rounds varied 1.05-1.66x), so fp32 + channels_last +
#   oneDNN (torch's default) on both. bf16 stays off: this CPU has no AVX512_BF16 or AMX, so
#   bf16 convolutions would be emulated (not measured here; the amx rule keeps its figure above).
# avx512_bf16 without AMX: 2-vCPU AMD EPYC (Zen 5, family 26 model 2; avx512_bf16, no AMX), batch 128, 2 threads
#   (benchmarks/cpu_train.py --arch ..., 2026-12-07), pairs/s fp32 / fp32 channels_last / bf16 / bf16 channels_last:
#   hardnet 273 / 388 / 660 / 690, hardnet8 202 / 250 / 464 / 511, l2net 296 / 442 / 851 / 1021,
#   sosnet 270 / 404 / 760 / 912, tfeat 2206 / 2570 / 3334 / 4688, siamese 1594 / 1424 / 2320 / 2175,
#   matchnet 126 / 217 / 266 / 443: bf16 + channels_last beats the avx512 choice (fp32 channels_last) by
#   1.5-2.3x on every architecture, so these CPUs train in bf16 as AMX ones do (oneDNN's avx512_core_bf16
#   kernels, not emulation). Zen 4 (family 25 model 17, 2026-12-07): hardnet 175 / 245 / 355 / 385, the other
#   architectures 1.5-2.0x fp32 channels_last too. Cooper Lake has the same instructions, not measured.
# baseline (no AVX2): not measured; the avx2 choice.
CPU_SETTINGS: dict[CpuTier, CpuSetting] = {
    "amx": CpuSetting(torch.bfloat16, True),
    "avx512_bf16": CpuSetting(torch.bfloat16, True),
    "avx512": CpuSetting(None, True),
    "avx2": CpuSetting(None, True),
    "baseline": CpuSetting(None, True),
}


def plan_for(use_gpu: bool, device: torch.device | None = None, features: Iterable[str] | None = None) -> DevicePlan:
    """GPU: NCCL, bf16 autocast, channels_last. CPU: gloo and the fastest measured setting for the
    CPU's feature set (``CPU_SETTINGS``; ``features`` defaults to this process's ``cpu_features()``)."""
    if use_gpu:
        return DevicePlan(device or torch.device("cuda"), "nccl", torch.bfloat16, True)
    tier = cpu_tier(cpu_features() if features is None else features)
    setting = CPU_SETTINGS[tier]
    return DevicePlan(device or torch.device("cpu"), "gloo", setting.amp_dtype, setting.channels_last,
                      eval_batch_size=128, cpu_tier=tier)


def gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0
