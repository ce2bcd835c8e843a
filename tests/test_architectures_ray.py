"""The architectures train in the real pipeline: Ray Train, 2 DDP workers, real shards.

One run per pipeline path, not per architecture. What the trainer does differently between models
under DDP is the model kind (embedding, or pair classifier with its own head and loss wiring) and where
PCA comes from (none, the model's own buffers, or a head the pipeline attaches). The first registered
architecture of each combination stands for it; the registry drives the choice, so a model with a new
combination is covered by registering it. Each rank computes its loss on its own batch as one process
does, so the losses are tested apart (tests/test_losses.py; the contrastive pair loss through the
pipeline in tests/test_digits.py), and what differs inside a model (every parameter reached by its own
loss's gradient, a few steps lowering it, shapes) is tested for every architecture in-process
(tests/test_models.py): each Ray Train fit costs ~28 CPU-s of process start-ups, and the 7 fits took
367 s, a third of the session-cluster tests' time, in a 1130 s suite on a 2-vCPU EPYC. The fits are
conftest's ``ddp_fit``: HardNet's is also tests/test_fault_tolerance.py's uninterrupted reference, and
each logs to a dead tracking port (tracking that fails never fails training)."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import checkpoint_fpr95
from pipeline.checkpoint import model_from_checkpoint
from pipeline.data.shards import shard_paths
from pipeline.evaluate import METRIC, fit_descriptor_pca
from pipeline.models import create_model, list_models, model_info


def pipeline_path(name: str) -> tuple[str, str]:
    info = model_info(name)
    return info.kind, info.pca


TRAINABLE = [name for name in list_models() if model_info(name).trainable]
PATHS: dict[tuple[str, str], str] = {}
for _name in TRAINABLE:
    PATHS.setdefault(pipeline_path(_name), _name)  # the first registered architecture of each path


@pytest.mark.parametrize("arch", sorted(PATHS.values()))
def test_architecture_trains_with_two_ddp_workers(arch, ddp_fit):
    run = ddp_fit(arch)  # tests/conftest.py: 3 steps of 16 pairs a rank per epoch, tracking to a dead port
    cfg, result = run.cfg, run.result
    assert math.isfinite(result.metrics["train_loss"]) and result.metrics["epoch"] == cfg.train.epochs
    # the reported figure is the checkpoint's model's (its PCA head included), recomputed apart
    assert result.metrics[METRIC] == checkpoint_fpr95(result.checkpoint.path, cfg)
    r0, r1 = (torch.load(run.dump / f"rank{r}-epoch0.pt") for r in (0, 1))
    params = {name for name, _ in create_model(arch, **cfg.model.factory_kwargs()).named_parameters()}
    assert params and all(torch.equal(r0[k], r1[k]) for k in params), "DDP let the ranks' weights diverge"
    model, _ = model_from_checkpoint(result.checkpoint.path)
    # with a PCA head (its own or one attached) the checkpoint's model gives the configured size
    assert model.descriptor_dim == (cfg.model.pca_dim or create_model(arch).descriptor_dim)
    x = torch.rand(4, 1, model.input_size, model.input_size)
    assert model(x).shape == (4, model.descriptor_dim)
    if cfg.model.attached_pca_dim:  # the head is the configured fit (learned whitening) of the trained tower, redone here
        components, mean = fit_descriptor_pca(model.backbone, shard_paths(cfg.data.shards, "train"), cfg.model.pca_dim,
                                              fit=cfg.model.pca_fit)
        # compared as the metric P^T P the head's distances depend on: axes of nearly equal variance may turn
        # within their plane between two fits whose descriptors differ in the last bits
        gram = model.pca.components.t() @ model.pca.components
        torch.testing.assert_close(gram, components.t() @ components, atol=1e-3 * gram.abs().max().item(), rtol=0)
        torch.testing.assert_close(model.pca.mean, mean, atol=2e-5, rtol=1e-4)
