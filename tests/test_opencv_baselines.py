"""OpenCV's SIFT, VGG, BoostDesc and TEBLID as untrainable baseline models (pipeline/models/opencv.py):
the conventions of the registry, the canvas that turns a patch into a keypoint against the descriptor
computed on the full image, Hamming equivalence of the binary ones, and their quality on real pairs."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from pipeline.data.synthetic import load_image
from pipeline.keypoints import keypoint_patches
from pipeline.metrics import average_precision, fpr_at_95_recall
from pipeline.models import create_model, list_models, model_info
from pipeline.models import opencv

needs_cv2 = pytest.mark.skipif(not opencv.opencv_available(), reason=f"needs the [baselines] extra: {opencv.EXTRA}")
NAMES = list(opencv.OPENCV_MODELS)
BINARY = [n for n in NAMES if opencv.SPECS[n].binary]
# photographs of the synthetic eval split (the window rule was measured on the training ones) on
# which OpenCV SIFT finds keypoints (none on clock_motion)
EVAL_PHOTOS = ("skimage:coins.png", "skimage:ihc.png")


def test_registered_without_cv2_and_creating_one_names_the_extra():
    code = ("import sys; sys.modules['cv2'] = None\n"  # what `import cv2` does when it is not installed
            "from pipeline.models import create_model, list_models, model_info\n"
            "names = [n for n in list_models() if n.startswith('opencv_')]\n"
            "assert names == ['opencv_boostdesc', 'opencv_sift', 'opencv_teblid', 'opencv_vgg'], names\n"
            "assert not any(model_info(n).trainable or model_info(n).default_loss for n in names)\n"
            "create_model('opencv_vgg')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last == ('ImportError: OpenCV baselines need opencv-contrib-python-headless: '
                    'pip install "patchflow[baselines]"'), proc.stderr


def test_every_baseline_is_registered_as_untrained():
    assert set(NAMES) <= set(list_models())
    assert all(model_info(n).default_loss is None and not model_info(n).trainable for n in NAMES)
    assert [model_info(n).descriptor_dim for n in NAMES] == [opencv.SPECS[n].dim for n in NAMES]


@needs_cv2
@pytest.mark.parametrize("name", NAMES)
def test_shape_dtype_and_input_checks(name):
    model = create_model(name)
    assert model.info == model_info(name) and model.info.kind == "embedding" and list(model.parameters()) == []
    assert model.input_size == 32 and model.descriptor_dim == opencv.SPECS[name].dim
    x = torch.rand(5, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    out = model(x)
    assert out.shape == (5, model.descriptor_dim) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and out.abs().sum() > 0
    if name in BINARY:
        assert set(out.unique().tolist()) <= {0.0, 1.0}
    assert model(x[:0]).shape == (0, model.descriptor_dim)
    for bad in (torch.rand(5, 3, 32, 32), torch.rand(5, 1, 16, 16), torch.rand(1, 32, 32)):
        with pytest.raises(ValueError, match="expects patches of shape"):
            model(bad)
    # the pipeline's uint8 patches / 255 are described exactly as the uint8 patches themselves
    u8 = np.random.default_rng(1).integers(0, 256, (3, 32, 32), dtype=np.uint8)
    np.testing.assert_array_equal(model(torch.from_numpy(u8).float()[:, None] / 255).numpy(),
                                  opencv.describe_patches(name, u8))


@needs_cv2
@pytest.mark.parametrize("name", ["opencv_sift", "opencv_teblid"])
@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_is_refused_with_a_clear_error(name, fmt, tmp_path):
    from pipeline.export import ExportError, export_descriptor

    with pytest.raises(ExportError, match=f"{name} computes descriptors with OpenCV outside torch"):
        export_descriptor(create_model(name), fmt, tmp_path / "x.onnx")
    assert list(tmp_path.iterdir()) == []


@needs_cv2
def test_training_config_refuses_a_baseline(tmp_path):
    from pipeline.config import ConfigError, load_config

    path = tmp_path / "c.yaml"
    path.write_text("data: {shards: s}\nmodel: {arch: opencv_vgg}\n")
    with pytest.raises(ConfigError, match="model.arch: 'opencv_vgg' is a fixed baseline, not trainable"):
        load_config(path, available_cpus=2, available_gpus=0)


def _photo_keypoints(ref: str, n: int = 60):
    img = np.rint(load_image(ref) * 255).astype(np.uint8)
    kps = opencv.detect_keypoints(img, n)
    return img, kps, keypoint_patches(img, kps)


@needs_cv2
@pytest.mark.parametrize("name", NAMES)
def test_canvas_rule_reproduces_the_full_image_descriptor(name):
    """At keypoints OpenCV SIFT detects on photographs the rule was not measured on, the canvas
    descriptor of the cut patch agrees with the descriptor computed on the full image better at the
    rule's window than at half or twice it."""
    agree = {}
    for factor in (0.5, 1.0, 2.0):
        scores = []
        for ref in EVAL_PHOTOS:
            img, kps, patches = _photo_keypoints(ref)
            full = opencv.compute(name, img, kps)
            got = opencv.describe_patches(name, patches, window=factor * opencv.WINDOW[name])
            scores.append(opencv.agreement(name, got, full))
        agree[factor] = float(np.concatenate(scores).mean())
    assert agree[1.0] > agree[0.5] + 0.05 and agree[1.0] > agree[2.0] + 0.05, agree
    assert agree[1.0] > (0.85 if name in BINARY else 0.8), agree


@needs_cv2
@pytest.mark.parametrize("name", NAMES)
def test_tiled_canvas_gives_the_descriptors_of_one_patch_per_call(name):
    _, _, patches = _photo_keypoints(EVAL_PHOTOS[0], 40)
    one = opencv.describe_patches(name, patches, tiles_per_call=1)
    np.testing.assert_array_equal(opencv.describe_patches(name, patches), one)
    np.testing.assert_array_equal(opencv.describe_patches(name, patches, tiles_per_call=7), one)  # partial grids


@pytest.fixture(scope="module")
def eval_pairs(synthetic_shards):
    from pipeline.data.shards import shard_paths
    from pipeline.data.stream import load_pairs

    return load_pairs(shard_paths(synthetic_shards, "eval"))[:2]


@needs_cv2
@pytest.mark.parametrize("name", BINARY)
def test_binary_l2_ranking_is_hamming_ranking(name, eval_pairs):
    """L2 on the unpacked bits = sqrt(Hamming distance) of OpenCV's packed bytes (cv2.norm, NORM_HAMMING),
    so FPR95 and AP equal the Hamming figures."""
    import cv2

    from pipeline.evaluate import pair_distances

    pairs, labels = eval_pairs
    l2 = pair_distances(create_model(name), pairs)
    packed = [opencv.describe_patches(name, pairs[:, side], raw=True) for side in (0, 1)]  # OpenCV's bytes
    assert packed[0].dtype == np.uint8 and packed[0].shape == (len(pairs), 32)
    hamming = np.array([cv2.norm(packed[0][i], packed[1][i], cv2.NORM_HAMMING) for i in range(len(pairs))])
    np.testing.assert_allclose(l2**2, hamming, atol=1e-3)
    assert fpr_at_95_recall(l2, labels) == fpr_at_95_recall(hamming, labels)
    assert average_precision(l2, labels) == pytest.approx(average_precision(hamming, labels), abs=1e-12)


@needs_cv2
@pytest.mark.parametrize("name", NAMES)
def test_every_baseline_ranks_positives_above_negatives(name, eval_pairs):
    from pipeline.evaluate import pair_distances

    pairs, labels = eval_pairs
    d = pair_distances(create_model(name), pairs)
    fpr, ap = fpr_at_95_recall(d, labels), average_precision(d, labels)
    # the control: the same distances under labels that say nothing about the pairs
    controls = [np.random.default_rng(s).permutation(labels) for s in range(5)]
    fpr_shuffled = np.mean([fpr_at_95_recall(d, c) for c in controls])
    ap_shuffled = np.mean([average_precision(d, c) for c in controls])
    assert fpr_shuffled > 0.85 and ap_shuffled < 0.6, (fpr_shuffled, ap_shuffled)
    # measured on these pairs: FPR95 0.27 (TEBLID) .. 0.65 (VGG), AP 0.69 (BoostDesc) .. 0.89 (SIFT)
    assert fpr < 0.75 and fpr < fpr_shuffled - 0.2, (fpr, fpr_shuffled)
    assert ap > ap_shuffled + 0.15, (ap, ap_shuffled)
