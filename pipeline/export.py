"""Export a descriptor model to a standalone file (TorchScript or ONNX) and load it back.

``export_descriptor(model, fmt, out)`` writes a file that computes the model's ``forward`` without this
package: ``(B, 1, S, S)`` float patches in [0, 1] -> ``(B, D)`` descriptors, any batch size B.

* ``"torchscript"`` (deprecated by torch 2.13 in favour of ``torch.export``, still fully working):
  ``torch.jit.trace`` of a CPU copy of the model in eval mode on an example batch of
  shape ``(2, 1, S, S)``, wrapped in a small scripted module that restores the input-shape check (a trace
  drops the model's Python ``if``); load with ``torch.jit.load``. The trace is checked on a batch of a
  different size before anything is written, so a model whose trace bakes in its batch size is refused.
* ``"onnx"``: the ``torch.export``-based ("dynamo") exporter of ``torch.onnx.export`` with a symbolic
  batch axis, opset ``ONNX_OPSET``, weights inside the file. It needs the ``onnx`` and ``onnxscript``
  packages (pinned in pyproject's dependencies); it was chosen over the deprecated TorchScript-based
  exporter (``dynamo=False``), which needs only ``onnx`` but mis-exports SOSNet (its ``eps`` default
  argument becomes a graph input). ``load_exported`` runs ONNX files with ``onnxruntime`` (test extra).

Pair classifiers (``kind == "pair_classifier"``, MatchNet): ``out`` holds the feature tower (``forward``);
a second file ``score_path(out)`` (``matchnet.onnx`` -> ``matchnet.score.onnx``) holds the metric network
``score(f1, f2) -> (B, 2)`` logits (column 1 = match) on two ``(B, D)`` feature batches.

Every registered model exports in both formats, SIFT (kornia's ``SIFTDescriptor``) included: trace and
``torch.export`` both handle it (tests/test_export.py checks each model and format on a batch size other
than the example's). A model that cannot be exported raises ``ExportError`` naming the model, the format
and the underlying error.

Files are written atomically: each goes to a temporary file in the destination directory and is moved
into place with ``os.replace`` only when every file of the export is complete; on failure nothing is
left behind and an existing file at ``out`` is untouched. Each file carries metadata (``input_size``,
``descriptor_dim``, ``kind``, ``role``): TorchScript as the extra file ``patchflow.json``, ONNX as model
``metadata_props``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import re
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
from torch import nn

from pipeline.models import info_of

FORMATS = ("torchscript", "onnx")
ONNX_OPSET = 18
EXAMPLE_BATCH = 2  # the example input's batch size; the exported files accept any batch size
METADATA_FILE = "patchflow.json"  # TorchScript extra file holding the metadata
_FILE_MODE = 0o644  # what open() would give with the usual umask 022
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # torch.onnx colours its error messages


class ExportError(RuntimeError):
    """The model cannot be exported in the requested format."""


def score_path(out: str | Path) -> Path:
    """Where the metric network of a pair classifier goes: ``dir/name.ext`` -> ``dir/name.score.ext``."""
    out = Path(out)
    return out.with_name(f"{out.stem}.score{out.suffix}")


# ---- wrappers: what exactly gets exported --------------------------------------------------------------


class _Score(nn.Module):
    """A pair classifier's ``score`` as a module's ``forward`` (what tracing / torch.export need)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, f1: torch.Tensor, f2: torch.Tensor) -> torch.Tensor:
        return self.model.score(f1, f2)


class _CheckedPatches(nn.Module):
    """Scripted around a traced descriptor: the trace loses the model's input-shape check; this restores it."""

    def __init__(self, traced: torch.jit.ScriptModule, input_size: int) -> None:
        super().__init__()
        self.traced = traced
        self.input_size = input_size

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        s = self.input_size
        if patches.dim() != 4 or patches.size(1) != 1 or patches.size(2) != s or patches.size(3) != s:
            raise ValueError(f"expected patches of shape (B, 1, {s}, {s}), got {patches.shape}")
        return self.traced(patches)


class _CheckedFeatures(nn.Module):
    """Scripted around a traced ``score``: checks both inputs are ``(B, D)`` batches of the same size."""

    def __init__(self, traced: torch.jit.ScriptModule, dim: int) -> None:
        super().__init__()
        self.traced = traced
        self.dim = dim

    def forward(self, f1: torch.Tensor, f2: torch.Tensor) -> torch.Tensor:
        d = self.dim
        if f1.dim() != 2 or f2.dim() != 2 or f1.size(1) != d or f2.size(1) != d or f1.size(0) != f2.size(0):
            raise ValueError(f"expected two (B, {d}) feature batches, got {f1.shape} and {f2.shape}")
        return self.traced(f1, f2)


# ---- export ----------------------------------------------------------------------------------------------


def _example_inputs(model: nn.Module, role: str, batch: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(batch)
    if role == "score":
        return tuple(torch.randn(batch, model.descriptor_dim, generator=g) for _ in range(2))
    return (torch.rand(batch, 1, model.input_size, model.input_size, generator=g),)


@contextlib.contextmanager
def _quiet_jit():
    """torch 2.13 deprecates torch.jit (a DeprecationWarning on every trace / script / save / load) and a
    trace warns about the models' Python shape checks (restored by the wrappers above): both are expected."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r"`torch\.jit\.")
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        yield


def _torchscript(model: nn.Module, role: str, meta: dict, path: Path) -> None:
    module = _Score(model) if role == "score" else model
    example = _example_inputs(model, role, EXAMPLE_BATCH)
    with _quiet_jit():
        traced = torch.jit.trace(module, example, check_trace=False)
        # A trace that hard-codes the batch size (a Python int, a numpy round trip) fails here, not when deployed.
        other = _example_inputs(model, role, EXAMPLE_BATCH + 3)
        with torch.no_grad():
            got, want = traced(*other), module(*other)
        if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-5):
            raise ExportError("the trace does not reproduce the model on another batch size (batch-dependent trace)")
        wrapper = _CheckedFeatures(traced, model.descriptor_dim) if role == "score" else _CheckedPatches(traced, model.input_size)
        torch.jit.save(torch.jit.script(wrapper), str(path), _extra_files={METADATA_FILE: json.dumps(meta)})


@contextlib.contextmanager
def _quiet_onnx():
    """The exporter prints its progress and logs that torchvision's ops are skipped: keep the CLI quiet."""
    log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(level)


def _onnx(model: nn.Module, role: str, meta: dict, path: Path) -> None:
    module = _Score(model) if role == "score" else model
    example = _example_inputs(model, role, EXAMPLE_BATCH)
    batch = torch.export.Dim("batch")
    if role == "score":
        names, dynamic_shapes = ["f1", "f2"], ({0: batch}, {0: batch})
    else:
        names, dynamic_shapes = ["patches"], ({0: batch},)
    with _quiet_onnx():
        program = torch.onnx.export(
            module,
            example,
            dynamo=True,
            input_names=names,
            output_names=["logits" if role == "score" else "descriptors"],
            dynamic_shapes=dynamic_shapes,
            opset_version=ONNX_OPSET,
            verbose=False,
        )
    program.model.metadata_props.update({k: json.dumps(v) for k, v in meta.items()})
    program.save(str(path), external_data=False)


def _reason(e: BaseException) -> str:
    """The root cause's first line: torch.onnx wraps the real error in a generic, coloured one."""
    while e.__cause__ is not None:
        e = e.__cause__
    lines = _ANSI.sub("", str(e)).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _metadata(model: nn.Module, role: str, fmt: str) -> dict:
    return {
        "format": fmt,
        "role": role,
        "model": type(model).__name__,
        "input_size": int(model.input_size),
        "descriptor_dim": int(model.descriptor_dim),
        "kind": model.info.kind,
        "unit_norm": model.info.unit_norm,
    }


def export_descriptor(model: nn.Module, fmt: Literal["torchscript", "onnx"], out: str | Path) -> Path:
    """Write ``model``'s descriptor (its ``forward``) as a standalone ``fmt`` file at ``out``; return ``out``.

    The model itself is left as it is (a CPU copy in eval mode is exported). For a pair classifier the
    metric network goes to ``score_path(out)`` too. Raises ``ValueError`` for an unknown format and
    ``ExportError`` for a model that lacks the conventions of ``pipeline.models`` or does not export.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    name = type(model).__name__
    for attr in ("input_size", "descriptor_dim"):
        if not isinstance(getattr(model, attr, None), int):
            raise ExportError(f"{name} has no integer {attr!r}: not a descriptor model of pipeline.models")
    if info_of(model) is None:
        raise ExportError(f"{name} has no ModelInfo 'info': not a descriptor model of pipeline.models")
    kind = model.info.kind
    if kind == "pair_classifier" and not callable(getattr(model, "score", None)):
        raise ExportError(f"{name} is a pair classifier without a score(f1, f2) method")

    out = Path(out)
    if out.is_dir():
        raise ExportError(f"{out} is a directory; give a file path")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        model = copy.deepcopy(model).float().cpu().eval()
    except Exception as e:  # noqa: BLE001 - e.g. a module holding an unpicklable handle
        raise ExportError(f"cannot copy {name} for export: {e}") from e
    targets = [("descriptor", out)] + ([("score", score_path(out))] if kind == "pair_classifier" else [])
    write = _torchscript if fmt == "torchscript" else _onnx

    temps: list[tuple[Path, Path]] = []
    try:
        for role, dest in targets:
            fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
            os.close(fd)
            os.chmod(tmp, _FILE_MODE)  # mkstemp's 0600 would follow the file through os.replace
            temps.append((Path(tmp), dest))
            try:
                write(model, role, _metadata(model, role, fmt), Path(tmp))
            except ExportError as e:
                raise ExportError(f"cannot export {name} ({role}) to {fmt}: {e}") from e
            except Exception as e:  # noqa: BLE001 - tracing / torch.export raise many types
                raise ExportError(f"cannot export {name} ({role}) to {fmt}: {_reason(e)} (full error chained)") from e
        for tmp, dest in temps:  # every file is complete: move them into place
            os.replace(tmp, dest)
    finally:
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)
    return out


# ---- load ------------------------------------------------------------------------------------------------


class ExportedDescriptor:
    """A loaded export file: call it on ``(B, 1, S, S)`` patches (the ``descriptor`` role) or on two
    ``(B, D)`` feature batches (the ``score`` role); numpy arrays or tensors in, a float32 numpy array out.

    uint8 patches are scaled to [0, 1] (the pipeline's convention); floats are used as they are.
    ``metadata`` holds what ``export_descriptor`` recorded (``input_size``, ``descriptor_dim``, ``kind``,
    ``role``, ``format``).
    """

    def __init__(self, path: Path, fmt: str, run: Callable[..., np.ndarray], metadata: dict) -> None:
        self.path, self.format, self._run, self.metadata = path, fmt, run, metadata

    @staticmethod
    def _as_array(x: np.ndarray | torch.Tensor) -> np.ndarray:
        a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        if a.dtype == np.uint8:
            return a.astype(np.float32) / np.float32(255.0)
        return np.ascontiguousarray(a, dtype=np.float32)

    def _check(self, arrays: list[np.ndarray]) -> None:
        role, meta = self.metadata.get("role"), self.metadata
        if role == "descriptor":
            s = meta["input_size"]
            if len(arrays) != 1 or arrays[0].ndim != 4 or arrays[0].shape[1:] != (1, s, s):
                raise ValueError(f"{self.path.name} expects one (B, 1, {s}, {s}) patch batch, got {[a.shape for a in arrays]}")
        elif role == "score":
            d = meta["descriptor_dim"]
            if len(arrays) != 2 or any(a.ndim != 2 or a.shape[1] != d for a in arrays) or len(arrays[0]) != len(arrays[1]):
                raise ValueError(f"{self.path.name} expects two (B, {d}) feature batches, got {[a.shape for a in arrays]}")

    def __call__(self, *inputs: np.ndarray | torch.Tensor) -> np.ndarray:
        arrays = [self._as_array(x) for x in inputs]
        self._check(arrays)
        return self._run(*arrays)

    def __repr__(self) -> str:
        return f"ExportedDescriptor({str(self.path)!r}, format={self.format!r}, metadata={self.metadata})"


def _load_torchscript(path: Path) -> ExportedDescriptor:
    extra = {METADATA_FILE: ""}
    with _quiet_jit():
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra).eval()
    metadata = json.loads(extra[METADATA_FILE]) if extra[METADATA_FILE] else {}

    def run(*arrays: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(*(torch.from_numpy(a) for a in arrays)).float().numpy()

    return ExportedDescriptor(path, "torchscript", run, metadata)


def _load_onnx(path: Path) -> ExportedDescriptor:
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ImportError("loading an ONNX export needs onnxruntime (pip install 'patchflow[test]')") from e
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    meta = session.get_modelmeta().custom_metadata_map
    metadata = {k: json.loads(v) for k, v in meta.items()}

    def run(*arrays: np.ndarray) -> np.ndarray:
        if len(arrays) != len(names):
            raise ValueError(f"{path.name} takes {len(names)} input(s) ({', '.join(names)}), got {len(arrays)}")
        return session.run(None, dict(zip(names, arrays)))[0]

    return ExportedDescriptor(path, "onnx", run, metadata)


def load_exported(path: str | Path) -> ExportedDescriptor:
    """Load a file written by ``export_descriptor`` (format detected from its content: TorchScript files
    are zip archives, anything else is read as ONNX) as a callable numpy -> numpy."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no exported descriptor at {path}")
    return _load_torchscript(path) if zipfile.is_zipfile(path) else _load_onnx(path)
