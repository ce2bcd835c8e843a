"""The one place device choices live: what the CPU plan does on this machine and on each CPU feature
set, and that evaluation stays fp32 on CPU whatever the training precision."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from pipeline.device import CPU_SETTINGS, _onednn_allows, cpu_features, cpu_tier, plan_for
from pipeline.evaluate import describe
from pipeline.models import create_model


def test_cpu_plan_trains_bf16_only_with_bf16_hardware() -> None:
    plan = plan_for(use_gpu=False)
    native_bf16 = bool({"amx", "avx512_bf16"} & cpu_features())  # AMX tiles, or AVX512_BF16 (Zen 4/5)
    assert plan.device.type == "cpu" and plan.ddp_backend == "gloo" and plan.channels_last
    assert plan.amp_dtype == (torch.bfloat16 if native_bf16 else None)
    x = plan.prepare_batch(torch.full((2, 1, 8, 8), 255, dtype=torch.uint8))
    # (no layout check on x: a 1-channel batch has the same strides in both memory formats; the
    # plan's channels_last acts through the model, which the training loop converts)
    assert x.dtype == torch.float32 and float(x.max()) == 1.0
    with plan.autocast():
        y = torch.nn.functional.conv2d(x, torch.ones(1, 1, 3, 3))
    assert y.dtype == (torch.bfloat16 if native_bf16 else torch.float32)


def test_cpu_evaluation_is_fp32_and_matches_a_plain_forward() -> None:
    torch.manual_seed(0)
    model = create_model("hardnet").eval()
    plan = plan_for(use_gpu=False)
    assert plan.eval_batch_size < 300  # so the patches below span several inference batches
    patches = np.random.default_rng(0).integers(0, 256, (300, 32, 32), dtype=np.uint8)
    got = describe(model, patches, plan)
    with torch.no_grad():
        want = model(torch.from_numpy(patches).float().div(255).unsqueeze(1)).numpy()
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-5)  # bf16 would be ~1e-2 off


# --- the CPU plan per feature set (issue 16): selection given the features, no timing ---

CPU_FLAGS = set(next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")), []))


@pytest.mark.parametrize(("features", "tier"), [
    (set(), "baseline"),
    ({"avx2"}, "avx2"),
    ({"avx2", "avx512"}, "avx512"),
    ({"avx2", "avx512", "avx512_bf16"}, "avx512_bf16"),  # Zen 4/5: bf16 measured 1.5-2.3x fp32 (device.py)
    ({"avx2", "avx512", "avx512_bf16", "amx"}, "amx"),
])
def test_cpu_tier_is_the_best_feature_present(features, tier) -> None:
    assert cpu_tier(features) == tier
    plan = plan_for(use_gpu=False, features=features)
    assert plan.cpu_tier == tier and plan.ddp_backend == "gloo" and plan.eval_batch_size == 128
    assert (plan.amp_dtype, plan.channels_last) == (CPU_SETTINGS[tier].amp_dtype, CPU_SETTINGS[tier].channels_last)
    # bf16 autocast only where oneDNN has native bf16 convolutions (AMX tiles or AVX512_BF16; emulated elsewhere)
    assert (plan.amp_dtype == torch.bfloat16) == bool({"amx", "avx512_bf16"} & features)


@pytest.mark.parametrize(("cap", "allowed"), [
    (None, {"avx2", "avx512", "avx512_bf16", "amx"}),
    ("AVX2", {"avx2"}),
    ("avx2", {"avx2"}),
    ("AVX512_CORE", {"avx2", "avx512"}),
    ("AVX512_CORE_BF16", {"avx2", "avx512", "avx512_bf16"}),
    ("AVX10_2_512", {"avx2", "avx512", "avx512_bf16"}),  # AVX10.2 without the AMX suffix has no AMX
    ("AVX512_CORE_AMX", {"avx2", "avx512", "avx512_bf16", "amx"}),
    ("ALL", {"avx2", "avx512", "avx512_bf16", "amx"}),
])
def test_onednn_isa_cap_hides_the_features_above_it(cap, allowed) -> None:
    assert {f for f in ("avx2", "avx512", "avx512_bf16", "amx") if _onednn_allows(f, cap)} == allowed


def _features_in_subprocess(env: dict[str, str]) -> set[str]:
    code = "from pipeline.device import cpu_features; print(','.join(sorted(cpu_features())))"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, check=True)
    return set(filter(None, out.stdout.strip().split(",")))


@pytest.mark.skipif(not CPU_FLAGS, reason="needs /proc/cpuinfo (Linux)")
def test_cpu_features_follow_the_cpu_and_the_isa_caps() -> None:
    native = _features_in_subprocess({"ATEN_CPU_CAPABILITY": "", "ONEDNN_MAX_CPU_ISA": ""})
    # against the kernel's view of the CPU: a feature is only claimed when its flag is there
    assert ("avx2" in native) == ("avx2" in CPU_FLAGS)
    assert ("avx512" in native) == ({"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= CPU_FLAGS)
    assert ("amx" in native) == ("amx_tile" in CPU_FLAGS)
    assert ("avx512_bf16" in native) <= ("avx512_bf16" in CPU_FLAGS)  # and torch agrees it is usable
    if "avx2" in CPU_FLAGS:  # the AVX2 stand-in used by benchmarks/cpu_step.py plans like an AVX2 machine
        capped = _features_in_subprocess({"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"})
        assert capped == {"avx2"}
