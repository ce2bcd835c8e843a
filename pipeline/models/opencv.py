"""OpenCV's descriptors as untrainable baseline models: SIFT, VGG, BoostDesc (BinBoost) and TEBLID.

What a user can ``pip install`` instead of patchflow (``opencv-contrib-python-headless``, the
``[baselines]`` extra; VGG, BoostDesc and TEBLID ship weights learned on PhotoTour inside the
wheel). OpenCV describes keypoints of a whole image, so each 32x32 patch becomes one:

* the patch (upsampled ``UPSAMPLE`` x, bicubic, where that is more than 1) goes into a tile with a
  reflected border wide enough that the descriptor never reads a neighbouring tile (``_border``),
  many tiles side by side in one canvas image, one ``cv2.compute`` call per canvas
  (``TILES_PER_CALL`` patches);
* one keypoint at the centre of each tile, angle 0 (the patch is already oriented), and a ``size``
  such that the descriptor's window is ``WINDOW[name]`` x the patch's side. A descriptor's window
  is ``size`` x its nominal ratio (``Spec.nominal``: SIFT's 4x4 cells of 3 sigma = 6 x size; VGG,
  BoostDesc and TEBLID sample ``scale_factor`` x size);
* SIFT reads the Gaussian pyramid level a detection of that size would have had (octave and
  layer packed into ``KeyPoint.octave`` as SIFT's detector packs them), so the gradients are
  smoothed at the keypoint's scale, as on a full image.

The window rule is measured, not tuned on any evaluation set (``benchmarks/opencv_window.py``):
OpenCV SIFT keypoints detected on scikit-image's bundled training photographs, each descriptor
computed on the full image at the keypoint (its documented setting for SIFT keypoints: TEBLID,
BoostDesc and VGG with ``scale_factor`` 6.75), the patch cut the way ``pipeline.data.sequences``
cuts it (``pipeline.keypoints.keypoint_patches``: LAF radius ``mr_size`` x sigma = 3 x ``size``, the
keypoint's orientation, ``extract_patches_from_pyramid``, 32x32), then the canvas descriptor compared with the full-image
one (mean cosine similarity; for the binary ones the fraction of equal bits) over window multiples
0.5 .. 2 and upsampling 1, 2, 4 (figures in benchmarks/README.md, "opencv_window.py"). Measured on
1579 keypoints (2026-12-01): the best window is 1.0 x the patch for SIFT (agreement 0.960) and
1.125 x for VGG (0.900), BoostDesc (0.935) and TEBLID (0.887), where theory puts it: the patch
covers 12 sigma, SIFT's window is 6 x size = 12 sigma, the others' 6.75 x size = 13.5 sigma. At
windows of 0.5 and 2 agreement is 0.15-0.32 lower. Upsampling gains at most 0.004 (for 4x / 16x
the pixels): none. SIFT at the pyramid level of its size agrees better (0.960) than on the canvas
itself (octave 0: 0.947), as OpenCV smooths at the keypoint's scale on a full image.

Binary descriptors (BoostDesc, TEBLID) return their bits unpacked as 0/1 floats, so the L2
distance the pipeline uses is sqrt(Hamming distance): the same ranking, so FPR95 / AP equal the
Hamming figures. cv2 is imported only when a model is created: the registry lists these models
without it, and creating one without it raises ``ImportError`` naming the extra. They run OpenCV
outside torch: no parameters, no gradients, no TorchScript / ONNX export (forward refuses to be
traced, with that message).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from pipeline.models.registry import ModelInfo, check_patches, register_model

EXTRA = 'pip install "patchflow[baselines]"'
PATCH = 32  # the patches' side; the canvas rule below was measured for it
UPSAMPLE = 1  # measured: 2x and 4x agree with the full image by at most 0.004 more, for 4x / 16x the pixels
TILES_PER_CALL = 256
# descriptor window / patch side, measured (see the module docstring): the window each descriptor has at
# the SIFT keypoint whose frame cut the patch (side 12 sigma): SIFT's 6 x size = 12 sigma, 6.75 x size = 13.5 sigma
WINDOW: dict[str, float] = {"opencv_sift": 1.0, "opencv_vgg": 1.125, "opencv_boostdesc": 1.125, "opencv_teblid": 1.125}
# OpenCV's documented scale_factor for SIFT keypoints (VGG, BoostDesc, TEBLID): only the full-image
# reference of the measurement depends on it, the canvas fixes the window through ``size``.
SIFT_KEYPOINT_SCALE = 6.75
VGG_120, BINBOOST_256 = 100, 302  # enum values of cv::xfeatures2d::VGG / BoostDesc (not exposed in Python)


def import_cv2() -> Any:
    """cv2 with the contrib modules, or one ImportError that names the extra to install."""
    try:
        import cv2
    except ImportError as e:
        raise ImportError(f"OpenCV baselines need opencv-contrib-python-headless: {EXTRA}") from e
    if not hasattr(cv2, "xfeatures2d"):
        raise ImportError(f"cv2 {cv2.__version__} has no xfeatures2d (opencv-python without contrib?): {EXTRA}")
    return cv2


def opencv_available() -> bool:
    try:
        import_cv2()
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class Spec:
    """One OpenCV descriptor: how to create it and how its window relates to ``KeyPoint.size``."""

    create: Callable[[Any, float], Any]  # (cv2, scale_factor) -> cv2 Feature2D
    nominal: float  # window side / keypoint size at ``scale_factor``
    dim: int  # output entries (bits for binary descriptors)
    binary: bool
    sift_pyramid: bool = False  # SIFT: keypoints carry the pyramid level of their size


SPECS: dict[str, Spec] = {
    "opencv_sift": Spec(lambda cv2, s: cv2.SIFT_create(), 6.0, 128, False, sift_pyramid=True),
    "opencv_vgg": Spec(lambda cv2, s: cv2.xfeatures2d.VGG_create(desc=VGG_120, scale_factor=s), SIFT_KEYPOINT_SCALE, 120,
                       False),
    "opencv_boostdesc": Spec(lambda cv2, s: cv2.xfeatures2d.BoostDesc_create(desc=BINBOOST_256, scale_factor=s),
                             SIFT_KEYPOINT_SCALE, 256, True),
    "opencv_teblid": Spec(lambda cv2, s: cv2.xfeatures2d.TEBLID_create(s, cv2.xfeatures2d.TEBLID_SIZE_256_BITS),
                          SIFT_KEYPOINT_SCALE, 256, True),
}
OPENCV_MODELS = tuple(SPECS)


@functools.cache
def extractor(name: str) -> Any:
    """The cv2 object of ``name`` (one per process: OpenCV's extractors keep no per-call state)."""
    spec = SPECS[name]
    return spec.create(import_cv2(), spec.nominal)


def _sift_level(sigma: np.ndarray) -> np.ndarray:
    """``KeyPoint.octave`` of SIFT keypoints of scale ``sigma`` (px): the octave and layer (of 3, base
    sigma 1.6) whose blur is closest to ``sigma``, packed as SIFT's detector packs them."""
    t = np.log2(np.maximum(sigma, 1.6) / 1.6)
    octave = np.floor(t).astype(int)
    layer = np.rint(3 * (t - octave)).astype(int)  # 0..3: layers 0..5 exist per octave
    return octave + (layer << 8)


def _border(window: float, side: int, sift: bool) -> int:
    """Reflected border (px, each side of a ``side`` px tile) so that a descriptor of that ``window``
    (px) at the tile's centre reads nothing of the neighbouring tiles.

    SIFT samples out to 0.88 x its window from the centre (sqrt(2) x 5/4 cells, for the rotation and
    the trilinear spreading) on an image blurred by up to its sigma (window / 12, 4 sigma of kernel);
    the others sample the window itself (VGG's Gaussian of 1.4 px: 6 px of kernel)."""
    reach = (0.884 + 4 / 12) * window if sift else 0.5 * window + 6
    return max(4, math.ceil(reach - side / 2))


def canvas(patches: np.ndarray, upsample: int, border: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 patches (N, P, P) -> (canvas uint8 (rows T, cols T), keypoint centres (N, 2) as x, y):
    each patch upsampled ``upsample`` x (bicubic; pixel areas preserved: patch pixel i covers canvas
    pixels u i .. u i + u - 1) with ``border`` reflected pixels around it, ``cols`` tiles per row."""
    n, p = len(patches), patches.shape[-1]
    side = p * upsample
    pad = math.ceil(border / upsample) + 2  # reflect in patch space, so the border is upsampled like the patch
    x = torch.from_numpy(np.ascontiguousarray(patches, dtype=np.float32))[:, None]
    x = torch.nn.functional.pad(x, (pad,) * 4, mode="reflect") if pad < p else _reflect_wide(x, pad)
    if upsample > 1:
        x = torch.nn.functional.interpolate(x, scale_factor=upsample, mode="bicubic", align_corners=False)
    cut = pad * upsample - border
    tiles = x[:, 0, cut : cut + side + 2 * border, cut : cut + side + 2 * border]
    tiles = tiles.round_().clamp_(0, 255).to(torch.uint8).numpy()
    t = side + 2 * border
    rows = -(-n // cols)
    full = np.zeros((rows * cols, t, t), np.uint8)
    full[:n] = tiles
    image = full.reshape(rows, cols, t, t).transpose(0, 2, 1, 3).reshape(rows * t, cols * t)
    idx = np.arange(n)
    centre = border + (side - 1) / 2  # the patch's centre, pixel centres at integers
    return image, np.stack([idx % cols * t + centre, idx // cols * t + centre], 1)


def _reflect_wide(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Reflect padding wider than the patch (torch refuses it): repeated reflection, as numpy does."""
    return torch.from_numpy(np.pad(x.numpy(), ((0, 0), (0, 0), (pad, pad), (pad, pad)), mode="reflect"))


def compute(name: str, image: np.ndarray, keypoints: list, raw: bool = False) -> np.ndarray:
    """Descriptors (len(keypoints), D) float32 of ``keypoints`` (each ``class_id`` = its index) on
    uint8 ``image``, bits unpacked for binary descriptors (``raw``: OpenCV's array as it is, bytes
    for those); refuses a call that drops keypoints."""
    spec = SPECS[name]
    if not keypoints:
        return np.zeros((0, spec.dim // 8 if raw and spec.binary else spec.dim), np.uint8 if raw and spec.binary else np.float32)
    found, desc = extractor(name).compute(image, keypoints)
    if desc is None or len(found) != len(keypoints):
        raise RuntimeError(f"{name}: OpenCV described {0 if desc is None else len(found)} of {len(keypoints)} keypoints")
    desc = desc[np.argsort([k.class_id for k in found])]
    if raw:
        return desc
    return (np.unpackbits(desc, axis=1) if spec.binary else desc).astype(np.float32)


def detect_keypoints(image: np.ndarray, max_keypoints: int) -> list:
    """OpenCV SIFT keypoints of uint8 ``image`` (the strongest ``max_keypoints``, ``class_id`` = index)
    whose full-image descriptors all stay inside the image: SIFT reads 0.88 x its window (6 x
    size) from the centre, the others 0.71 x theirs (6.75 x size, rotated)."""
    cv2 = import_cv2()
    h, w = image.shape
    kept = [k for k in cv2.SIFT_create(nfeatures=max_keypoints).detect(image, None)
            if 5.4 * k.size <= min(k.pt[0], k.pt[1], w - 1 - k.pt[0], h - 1 - k.pt[1])]
    return [cv2.KeyPoint(k.pt[0], k.pt[1], k.size, k.angle, k.response, k.octave, i) for i, k in enumerate(kept)]


def agreement(name: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per row of two descriptor arrays of ``name``: the fraction of equal bits (binary descriptors)
    or the cosine similarity."""
    if SPECS[name].binary:
        return 1.0 - np.abs(a - b).mean(1)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


def describe_patches(name: str, patches: np.ndarray, window: float | None = None, upsample: int = UPSAMPLE,
                     tiles_per_call: int = TILES_PER_CALL, sift_pyramid: bool | None = None,
                     raw: bool = False) -> np.ndarray:
    """uint8 patches (N, P, P) -> descriptors (N, D) float32 through OpenCV's ``name`` on tiled canvases.

    ``window``: descriptor window / patch side (default ``WINDOW[name]``); ``sift_pyramid``: SIFT
    reads the pyramid level of the keypoint's size (default) or the canvas itself (False); ``raw``:
    OpenCV's own arrays (packed bytes for binary descriptors).
    """
    cv2 = import_cv2()
    spec = SPECS[name]
    window = WINDOW[name] if window is None else window
    sift_pyramid = spec.sift_pyramid if sift_pyramid is None else sift_pyramid
    side = patches.shape[-1] * upsample
    size = window * side / spec.nominal
    border = _border(window * side, side, spec.sift_pyramid)
    border += -(side // 2 + border) % 4  # tiles of a multiple of 8 px: SIFT's octaves halve the canvas alike
    octave = int(_sift_level(np.array([size / 2]))[0]) if sift_pyramid else 0
    out = []
    for start in range(0, len(patches), tiles_per_call):
        chunk = patches[start : start + tiles_per_call]
        image, centres = canvas(chunk, upsample, border, cols=math.ceil(math.sqrt(len(chunk))))
        kps = [cv2.KeyPoint(float(x), float(y), size, 0.0, 0.0, octave, i) for i, (x, y) in enumerate(centres)]
        out.append(compute(name, image, kps, raw))
    return np.concatenate(out) if out else compute(name, np.zeros((1, 1), np.uint8), [], raw)  # an empty batch


class OpenCVDescriptor(nn.Module):
    """Base of the OpenCV baselines: float patches in [0, 1] -> OpenCV's descriptor of each, as floats.

    Shape: ``(B, 1, 32, 32) -> (B, D)``.
    """

    name: str  # the registered name, a key of SPECS

    def __init__(self) -> None:
        super().__init__()
        extractor(self.name)  # fail now, with the extra's name, rather than at the first batch

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        check_patches(patches, self.input_size, type(self).__name__)
        if torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export():
            raise RuntimeError(f"{self.name} computes descriptors with OpenCV outside torch: it cannot be exported "
                               f"to TorchScript / ONNX (describe patches with the model itself)")
        u8 = (patches.detach().float().cpu()[:, 0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        return torch.from_numpy(describe_patches(self.name, u8)).to(patches.device)


class OpenCVSIFT(OpenCVDescriptor):
    """OpenCV's SIFT descriptor (``cv2.SIFT_create()``) of each patch.

    Shape: ``(B, 1, 32, 32) -> (B, 128)``; OpenCV's values (unit vector x 512, entries clipped at 0.2
    before renormalising, rounded), not rescaled.
    """

    name = "opencv_sift"


class OpenCVVGG(OpenCVDescriptor):
    """OpenCV's VGG descriptor (Simonyan et al. 2014; ``VGG_create(VGG_120)``, learned on PhotoTour).

    Shape: ``(B, 1, 32, 32) -> (B, 120)``; OpenCV's raw projections (``dsc_normalize=False``).
    """

    name = "opencv_vgg"


class OpenCVBoostDesc(OpenCVDescriptor):
    """OpenCV's BinBoost descriptor (Trzcinski et al. 2013; ``BoostDesc_create(BINBOOST_256)``).

    Shape: ``(B, 1, 32, 32) -> (B, 256)``; bits as 0/1 floats (L2 distance = sqrt(Hamming)).
    """

    name = "opencv_boostdesc"


class OpenCVTEBLID(OpenCVDescriptor):
    """OpenCV's TEBLID descriptor (Suarez et al. 2021; ``TEBLID_create(6.75, SIZE_256_BITS)``).

    Shape: ``(B, 1, 32, 32) -> (B, 256)``; bits as 0/1 floats (L2 distance = sqrt(Hamming)).
    """

    name = "opencv_teblid"


for _cls in (OpenCVSIFT, OpenCVVGG, OpenCVBoostDesc, OpenCVTEBLID):  # fixed baselines: never trained
    register_model(_cls.name, ModelInfo(input_size=PATCH, descriptor_dim=SPECS[_cls.name].dim, default_loss=None, pca="none",
                                        unit_norm=False, trainable=False))(_cls)
