"""OpenCV keypoints cut into patches the way ``pipeline.data.sequences`` cuts its frames: what the
OpenCV baselines' window rule is measured on (``benchmarks/opencv_window.py``, tests/test_opencv_baselines.py).
Here, not in ``pipeline.models.opencv``, because it needs the data layer, which sits above the models."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.data.sequences import PARAMS, extract
from pipeline.models.opencv import PATCH


def keypoint_patches(image: np.ndarray, keypoints: list, patch_size: int = PATCH) -> np.ndarray:
    """uint8 patches (N, P, P) of OpenCV keypoints cut the way ``pipeline.data.sequences`` cuts them:
    LAF radius ``mr_size`` x sigma (sigma = size / 2), the keypoint's orientation,
    ``extract_patches_from_pyramid``. OpenCV's angle turns clockwise in image coordinates (y down):
    the direction each descriptor turns into its +x axis becomes the patch's +x axis."""
    if not keypoints:
        return np.zeros((0, patch_size, patch_size), np.uint8)
    radius = PARAMS["mr_size"] * np.array([k.size for k in keypoints]) / 2
    a = np.deg2rad([k.angle for k in keypoints])
    lafs = np.zeros((len(keypoints), 2, 3))
    lafs[:, 0, 0], lafs[:, 0, 1], lafs[:, 1, 0], lafs[:, 1, 1] = np.cos(a), -np.sin(a), np.sin(a), np.cos(a)
    lafs[:, :, :2] *= radius[:, None, None]
    lafs[:, :, 2] = [k.pt for k in keypoints]
    return extract(torch.from_numpy(image.astype(np.float32) / 255)[None, None], lafs, patch_size)
