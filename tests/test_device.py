"""The one place device choices live: what the CPU plan does on this machine, and that evaluation
stays fp32 on CPU whatever the training precision."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.device import cpu_has_amx, plan_for
from pipeline.evaluate import describe
from pipeline.models import create_model


def test_cpu_plan_trains_bf16_only_with_amx() -> None:
    plan = plan_for(use_gpu=False)
    assert plan.device.type == "cpu" and plan.ddp_backend == "gloo" and plan.channels_last
    assert plan.amp_dtype == (torch.bfloat16 if cpu_has_amx() else None)
    x = plan.prepare_batch(torch.full((2, 1, 8, 8), 255, dtype=torch.uint8))
    # (no layout check on x: a 1-channel batch has the same strides in both memory formats; the
    # plan's channels_last acts through the model, which the training loop converts)
    assert x.dtype == torch.float32 and float(x.max()) == 1.0
    with plan.autocast():
        y = torch.nn.functional.conv2d(x, torch.ones(1, 1, 3, 3))
    assert y.dtype == (torch.bfloat16 if cpu_has_amx() else torch.float32)


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
