"""pipeline.export: every registered model round-trips through TorchScript and ONNX on a batch size other
than the export example's (the batch axis is dynamic), and failures leave no file behind."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.export import EXAMPLE_BATCH, FORMATS, ExportError, export_descriptor, load_exported, score_path
from pipeline.models import ModelInfo, create_model, list_models
from pipeline.models.opencv import OPENCV_MODELS
from pipeline.pca import attach_pca, fit_pca

TOL = {"torchscript": 1e-5, "onnx": 1e-4}
SUFFIX = {"torchscript": ".pt", "onnx": ".onnx"}
BATCH = EXAMPLE_BATCH + 3  # a batch size the export never saw


@functools.cache
def _model(name: str) -> nn.Module:
    """The registered model with defaults, BatchNorm running stats moved off their init (mean 0, var 1) by
    a few train-mode forwards on shifted inputs, then in eval mode."""
    torch.manual_seed(0)
    model = create_model(name)
    s = model.input_size
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(0.3 + 0.5 * torch.rand(16, 1, s, s))
    model.eval()
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert all(not torch.allclose(m.running_var, torch.ones_like(m.running_var)) for m in bns)
    return model


def _patches(model: nn.Module, n: int = BATCH, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 1, model.input_size, model.input_size, generator=torch.Generator().manual_seed(seed))


def _files(directory) -> set[str]:
    return {p.name for p in directory.iterdir()}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", list_models())
def test_export_reproduces_model_on_another_batch_size(name, fmt, tmp_path):
    if name in OPENCV_MODELS:
        pytest.skip("OpenCV baselines run outside torch: export is refused (tests/test_opencv_baselines.py)")
    model = _model(name)
    out = export_descriptor(model, fmt, tmp_path / f"{name}{SUFFIX[fmt]}")
    assert out == tmp_path / f"{name}{SUFFIX[fmt]}" and out.stat().st_size > 0
    assert not model.training  # the model passed in is left as it was

    exported = load_exported(out)
    assert exported.metadata["input_size"] == model.input_size
    assert exported.metadata["descriptor_dim"] == model.descriptor_dim
    assert exported.metadata["role"] == "descriptor" and exported.metadata["format"] == fmt

    x = _patches(model)
    with torch.no_grad():
        want = model(x).numpy()
    got = exported(x)
    assert got.shape == (BATCH, model.descriptor_dim) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=TOL[fmt], atol=TOL[fmt])
    np.testing.assert_allclose(exported(x.numpy()), want, rtol=TOL[fmt], atol=TOL[fmt])  # numpy in, too

    expected_files = {out.name}
    if model.info.kind == "pair_classifier":  # MatchNet: the metric network is the second file
        score = load_exported(score_path(out))
        assert score.metadata["role"] == "score"
        f1, f2 = torch.from_numpy(want), torch.from_numpy(want[::-1].copy())
        with torch.no_grad():
            logits = model.score(f1, f2).numpy()
        np.testing.assert_allclose(score(f1, f2), logits, rtol=TOL[fmt], atol=TOL[fmt])
        expected_files.add(score_path(out).name)
        with pytest.raises(ValueError, match="feature batches"):
            score(f1, f2[:-1])
    assert _files(tmp_path) == expected_files  # no temporary files left

    with pytest.raises(ValueError, match="expects"):
        exported(torch.rand(3, 1, model.input_size + 1, model.input_size + 1))


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
def test_torchscript_keeps_the_input_check_inside_the_file(tmp_path):
    out = export_descriptor(_model("hardnet"), "torchscript", tmp_path / "hardnet.pt")
    module = torch.jit.load(str(out))  # used directly, without load_exported
    assert module(_patches(_model("hardnet"), 4)).shape == (4, 128)
    with pytest.raises(Exception, match=r"expected patches of shape \(B, 1, 32, 32\)"):
        module(torch.rand(4, 1, 31, 31))


def test_uint8_patches_are_scaled_like_the_pipeline(tmp_path):
    model = _model("l2net")
    exported = load_exported(export_descriptor(model, "torchscript", tmp_path / "l2net.pt"))
    u8 = np.random.default_rng(0).integers(0, 256, size=(3, 1, 32, 32), dtype=np.uint8)
    with torch.no_grad():
        want = model(torch.from_numpy(u8).float() / 255.0).numpy()
    np.testing.assert_allclose(exported(u8), want, rtol=1e-5, atol=1e-5)


def test_pca_attached_model_exports(tmp_path):
    model = _model("hardnet")
    with torch.no_grad():
        desc = model(_patches(model, 64, seed=3))
    with_pca = attach_pca(model, *fit_pca(desc, 16)).eval()
    exported = load_exported(export_descriptor(with_pca, "torchscript", tmp_path / "pca.pt"))
    x = _patches(model)
    with torch.no_grad():
        np.testing.assert_allclose(exported(x), with_pca(x).numpy(), rtol=1e-5, atol=1e-5)
    assert exported.metadata["descriptor_dim"] == 16


def test_export_leaves_the_model_in_its_mode(tmp_path):
    model = create_model("tfeat").train()
    export_descriptor(model, "torchscript", tmp_path / "tfeat.pt")
    assert model.training


def test_unknown_format_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unknown export format 'tflite'.*torchscript, onnx"):
        export_descriptor(_model("tfeat"), "tflite", tmp_path / "x.tflite")
    assert _files(tmp_path) == set()


class _NotExportable(nn.Module):
    """Exports in neither format. torch.export (ONNX) refuses the data-dependent branch; a trace
    (TorchScript) records the numpy round trip's result for the example batch as a constant, which the
    export's check on another batch size catches."""

    input_size = 32
    descriptor_dim = 4
    info = ModelInfo(input_size=32, descriptor_dim=4, default_loss=None, pca="none", unit_norm=False, trainable=False)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        if patches.mean() > 2.0:  # data-dependent control flow
            patches = patches.clamp(max=1.0)
        return torch.from_numpy(np.tile(patches.numpy().mean(axis=(1, 2, 3))[:, None], (1, self.descriptor_dim)))


@pytest.mark.parametrize("fmt", FORMATS)
def test_non_exportable_model_raises_and_leaves_nothing(fmt, tmp_path):
    out = tmp_path / f"model{SUFFIX[fmt]}"
    out.write_bytes(b"previous export")
    with pytest.raises(ExportError, match=f"cannot export _NotExportable \\(descriptor\\) to {fmt}"):
        export_descriptor(_NotExportable(), fmt, out)
    assert out.read_bytes() == b"previous export"  # the earlier file is untouched...
    assert _files(tmp_path) == {out.name}  # ...and no temporary file is left


def test_model_without_conventions_is_refused(tmp_path):
    with pytest.raises(ExportError, match="no integer 'input_size'"):
        export_descriptor(nn.Linear(4, 4), "torchscript", tmp_path / "linear.pt")
    assert _files(tmp_path) == set()


def test_load_exported_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_exported(tmp_path / "nothing.onnx")
