"""Observation points of the training loop, injected through ``build_trainer(..., hooks=...)``.

The loop calls every hook unconditionally; the base class does nothing, so the hot loop carries no
test branches. The hooks here are what the tests inject: fault injection (``FailOnce``), which pairs a
rank read and on which node (``RecordReads``), each rank's weights (``DumpParams``), and a pause in which
the test acts on the world outside (``HandOff``: e.g. stops the tracking server). A hooks object
is pickled to every worker, so each rank (and each restarted worker) holds its own copy.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn


class TrainHooks:
    """No-op hooks; subclass and override what you need."""

    def on_batch(self, batch: dict[str, Any], *, rank: int) -> None:
        """A training batch as the loader gave it, before augmentation."""

    def after_backward(self, *, rank: int, epoch: int, step: int) -> None:
        """Gradients are computed; the optimizer has not stepped (``step`` = steps done before)."""

    def end_of_epoch(self, *, rank: int, epoch: int, model: nn.Module) -> None:
        """The epoch is trained and evaluated (a PCA head fitted); nothing is reported yet."""


@dataclass
class HookList(TrainHooks):
    hooks: list[TrainHooks]

    def on_batch(self, batch, *, rank):
        for h in self.hooks:
            h.on_batch(batch, rank=rank)

    def after_backward(self, *, rank, epoch, step):
        for h in self.hooks:
            h.after_backward(rank=rank, epoch=epoch, step=step)

    def end_of_epoch(self, *, rank, epoch, model):
        for h in self.hooks:
            h.end_of_epoch(rank=rank, epoch=epoch, model=model)


@dataclass
class FailOnce(TrainHooks):
    """Raise once on ``rank`` at ``step``, remembered in a ``marker`` file so the restarted worker goes on."""

    rank: int
    step: int
    marker: str

    def after_backward(self, *, rank, epoch, step):
        if rank == self.rank and step == self.step and not Path(self.marker).exists():
            Path(self.marker).write_text(f"failed at epoch {epoch} step {step}")
            raise RuntimeError(f"injected failure on rank {rank} at step {step}")


@dataclass
class RecordReads(TrainHooks):
    """Write ``rank{r}-epoch{e}.json`` into ``directory``: the rank, its Ray node id and the id of every
    pair it trained on that epoch, in order."""

    directory: str
    _ids: list[torch.Tensor] = field(default_factory=list, repr=False)

    def on_batch(self, batch, *, rank):
        self._ids.append(batch["ids"][:, 0].clone())

    def end_of_epoch(self, *, rank, epoch, model):
        import ray

        record = {"rank": rank, "node": ray.get_runtime_context().get_node_id(), "ids": torch.cat(self._ids).tolist()}
        (Path(self.directory) / f"rank{rank}-epoch{epoch}.json").write_text(json.dumps(record))
        self._ids = []


@dataclass
class DumpParams(TrainHooks):
    """Save each rank's ``state_dict`` as ``rank{r}-epoch{e}.pt`` in ``directory``, to compare ranks."""

    directory: str

    def end_of_epoch(self, *, rank, epoch, model):
        torch.save(model.state_dict(), Path(self.directory) / f"rank{rank}-epoch{epoch}.pt")


@dataclass
class HandOff(TrainHooks):
    """On rank 0 at the end of each epoch in ``actions`` ({epoch: name}): write ``{name}.request`` into
    ``directory`` and wait for the test to write ``{name}.done`` (once: a restarted worker goes on)."""

    directory: str
    actions: dict[int, str]
    timeout_s: float = 300.0

    def end_of_epoch(self, *, rank, epoch, model):
        name = self.actions.get(epoch)
        if rank != 0 or name is None or (Path(self.directory) / f"{name}.done").exists():
            return
        (Path(self.directory) / f"{name}.request").write_text(f"epoch {epoch}")
        deadline = time.monotonic() + self.timeout_s
        while not (Path(self.directory) / f"{name}.done").exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"HandOff: nobody answered {name}.request in {self.directory}")
            time.sleep(0.2)
