"""Detection (kornia scale-space detectors: DoG, Harris, Hessian), PhotoTour's re-detection criterion,
and the plane check (does the homography explain image k around a point?)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from pipeline.data.sequences.frames import _to_tensor, circle_overlap_error, frames_inside, laf_angle, laf_scale
from pipeline.data.sequences.params import PARAMS


# Scale-space detectors by name: kornia ScaleSpaceDetector on ScalePyramid(3, 1.6, 32, double_image=True)
# with ConvQuadInterp3d refinement. DoG is the SIFT-like configuration of SIFTFeatureScaleSpace (a
# scale-space response: minima are blobs too); Harris (k = 0.04) and Hessian (determinant) responses
# are computed per pyramid level and normalised by sigma^4, as in kornia's Hessian-based detectors.
DETECTORS: dict[str, str] = {
    "dog": "BlobDoG, scale-space response, minima_are_also_good=True",
    "harris": "CornerHarris(k=0.04), per-level response x sigma^4, maxima",
    "hessian": "BlobHessian (determinant), per-level response x sigma^4, maxima",
}


def detect_frames(img: np.ndarray, max_keypoints: int = 2000, detectors: str | Sequence[str] = "dog",
                  upright: bool = False, mr_size: float | None = None) -> np.ndarray:
    """LAFs float64 (n, 2, 3) in pixels of the strongest keypoints of ``img`` (H, W) in [0, 1],
    strongest first, near-duplicates (same place, similar scale) and frames leaving the image removed.

    ``detectors``: a name of ``DETECTORS`` or several, whose keypoints are merged by rank (their
    responses are not comparable), at most ``max_keypoints`` in all. ``upright``: no orientation
    assignment (frames A = r I) instead of LAFOrienter's dominant orientation. ``mr_size``: frame
    radius / detection sigma (default ``PARAMS["mr_size"]``)."""
    names = [detectors] if isinstance(detectors, str) else list(detectors)
    unknown = [d for d in names if d not in DETECTORS]
    if unknown or not names:
        raise ValueError(f"detectors must be some of {sorted(DETECTORS)}, got {detectors!r}")
    found = [_detect(img, max_keypoints, d, upright, PARAMS["mr_size"] if mr_size is None else mr_size)
             for d in names]
    if len(found) == 1:
        return _drop_duplicates(found[0])
    ranked = sorted((rank, i) for i, f in enumerate(found) for rank in range(len(f)))  # each one's best, in turn
    merged = np.stack([found[i][rank] for rank, i in ranked]) if ranked else np.zeros((0, 2, 3))
    return _drop_duplicates(merged)[:max_keypoints]


def _detect(img: np.ndarray, max_keypoints: int, name: str, upright: bool, mr_size: float) -> np.ndarray:
    """One detector's frames, strongest first, those leaving the image removed: kornia's
    ``ScaleSpaceDetector.forward`` in its two stages, the scale-space search (``_scale_space``,
    memoised: every construction of one image with the same detector and radius shares it; a
    varied mix cuts up to four) and the orientation (LAFOrienter, or none for upright frames)."""
    import kornia.feature as KF

    responses, lafs, filled = _scale_space(img, max_keypoints, name, mr_size)
    if not upright:
        with torch.no_grad():
            lafs = KF.LAFOrienter(19)(lafs, _to_tensor(img))
    keep = filled[0].numpy()  # slots no detection filled (zero frames) are dropped
    lafs, resp = lafs[0].double().numpy()[keep], responses[0].abs().double().numpy()[keep]
    lafs = lafs[np.argsort(-resp, kind="stable")]
    return lafs[frames_inside(lafs, img.shape)]


# _scale_space's memo: a few images' worth (a varied mix generates one photograph's constructions in
# turn; the evaluation of a sequence, its six images); entries are (n, 2, 3) frames, a few kB each.
_SCALE_SPACE_MEMO: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
_SCALE_SPACE_MEMO_SIZE = 64


def _scale_space(img: np.ndarray, max_keypoints: int, name: str, mr_size: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(responses (1, n), upright frames (1, n, 2, 3), filled slots (1, n)) of ``ScaleSpaceDetector.detect``
    plus its affine-shape stage (PassLAF), memoised by the image's bytes and the settings."""
    import hashlib

    import kornia.feature as KF
    from kornia.feature.laf import laf_is_filled
    from kornia.geometry.subpix import ConvQuadInterp3d
    from kornia.geometry.transform import ScalePyramid

    img = np.ascontiguousarray(img)
    key = (hashlib.blake2b(img.view(np.uint8), digest_size=16).digest(), img.shape, img.dtype.str, max_keypoints,
           name, float(mr_size))
    if key in _SCALE_SPACE_MEMO:
        return _SCALE_SPACE_MEMO[key]
    scale_space = name == "dog"  # DoG's response spans levels; it needs 3 extra pyramid levels, the others 2
    response = {"dog": KF.BlobDoG, "harris": lambda: KF.CornerHarris(0.04), "hessian": KF.BlobHessian}[name]()
    detector = KF.ScaleSpaceDetector(
        max_keypoints, mr_size=mr_size, resp_module=response, subpix_module=ConvQuadInterp3d(),
        scale_pyr_module=ScalePyramid(3, 1.6, 32, double_image=True, extra_levels=3 if scale_space else 2),
        ori_module=KF.PassLAF(), scale_space_response=scale_space, minima_are_also_good=scale_space)
    with torch.no_grad():
        tensor = _to_tensor(img)
        responses, lafs = detector.detect(tensor, max_keypoints)
        lafs = detector.aff(lafs, tensor)
    filled = laf_is_filled(lafs)
    if len(_SCALE_SPACE_MEMO) >= _SCALE_SPACE_MEMO_SIZE:
        _SCALE_SPACE_MEMO.pop(next(iter(_SCALE_SPACE_MEMO)))  # the oldest
    _SCALE_SPACE_MEMO[key] = (responses, lafs, filled)
    return responses, lafs, filled


def _drop_duplicates(lafs: np.ndarray) -> np.ndarray:
    """Greedy, strongest first: a frame is dropped when a kept, stronger one is near (centres closer
    than ``duplicate_distance`` x the larger scale) and of similar scale. Candidate pairs come from a
    k-d tree, so only frames with a close stronger one are visited in order (an all-pairs Python loop
    was a third of each detection)."""
    from scipy.spatial import cKDTree

    if len(lafs) < 2:
        return lafs
    c, s = lafs[:, :, 2], laf_scale(lafs)
    pairs = cKDTree(c).query_pairs(PARAMS["duplicate_distance"] * float(s.max()) * (1 + 1e-9), output_type="ndarray")
    i, j = pairs.reshape(-1, 2).T  # query_pairs gives i < j: i is the stronger frame
    big = np.maximum(s[i], s[j])
    near = np.linalg.norm(c[i] - c[j], axis=1) < PARAMS["duplicate_distance"] * big
    similar = big / np.minimum(s[i], s[j]) < PARAMS["duplicate_scale_ratio"]
    i, j = i[near & similar], j[near & similar]  # j (weaker) clashes with i (stronger)
    order = np.argsort(j, kind="stable")
    i, j = i[order], j[order]
    weaker, starts = np.unique(j, return_index=True)
    keep = np.ones(len(lafs), bool)
    for later, stronger in zip(weaker, np.split(i, starts[1:])):  # in order: the stronger ones are settled
        if keep[stronger].any():
            keep[later] = False
    return lafs[keep]


def best_redetection(mapped: np.ndarray, found: np.ndarray) -> np.ndarray:
    """For each ``mapped`` frame (n, 2, 3), the index into ``found`` of the detection that repeats it
    best, -1 where none does. PhotoTour's criterion: overlap error of the regions (circles of the
    frames' areas) at most ``PARAMS["max_overlap_error"]`` and orientations within
    ``PARAMS["max_orientation_difference_deg"]``; among those passing, the smallest overlap error
    (ties: the first, i.e. the strongest, since detections come strongest first)."""
    best = np.full(len(mapped), -1, np.int64)
    if len(found) == 0 or len(mapped) == 0:
        return best
    from scipy.spatial import cKDTree

    r_map, r_found = laf_scale(mapped), laf_scale(found)
    a_map, a_found = laf_angle(mapped), laf_angle(found)
    max_turn = np.deg2rad(PARAMS["max_orientation_difference_deg"])
    tree = cKDTree(found[:, :, 2])
    for i, near in enumerate(tree.query_ball_point(mapped[:, :, 2], r_map + r_found.max())):
        if near:
            near = np.sort(np.asarray(near))  # strongest first, so argmin's tie-break is the strongest
            d = np.linalg.norm(found[near, :, 2] - mapped[i, :, 2], axis=1)
            err = circle_overlap_error(d, r_map[i], r_found[near])
            turn = np.abs(np.angle(np.exp(1j * (a_found[near] - a_map[i]))))
            err = np.where((err <= PARAMS["max_overlap_error"]) & (turn <= max_turn), err, np.inf)
            j = int(np.argmin(err))
            if np.isfinite(err[j]):
                best[i] = near[j]
    return best


def redetected(mapped: np.ndarray, found: np.ndarray) -> np.ndarray:
    """Mask of ``mapped`` frames (n, 2, 3) that some frame of ``found`` repeats (``best_redetection``)."""
    return best_redetection(mapped, found) >= 0


def plane_ncc(img1: np.ndarray, img_k: np.ndarray, hom: np.ndarray) -> np.ndarray:
    """Local normalised cross-correlation (H1, W1) of image 1 and image k warped into image 1 by
    ``hom``^-1: near 1 where the homography explains image k, low on things off its plane. Gaussian
    window (``plane_window_sigma``) restricted to the part image k covers; 0 where it covers none."""
    from kornia.geometry.transform import warp_perspective
    from scipy import ndimage

    p = PARAMS
    inv = torch.from_numpy(np.linalg.inv(hom)).float()[None]
    warped = warp_perspective(_to_tensor(img_k), inv, img1.shape, mode="bilinear", align_corners=True)[0, 0].numpy()
    covered = warp_perspective(torch.ones(1, 1, *img_k.shape), inv, img1.shape, mode="nearest",
                               align_corners=True)[0, 0].numpy().astype(np.float64)
    a = ndimage.gaussian_filter(img1.astype(np.float64), p["plane_blur_sigma"])
    b = ndimage.gaussian_filter(warped.astype(np.float64), p["plane_blur_sigma"])
    weight = ndimage.gaussian_filter(covered, p["plane_window_sigma"])

    def mean(x: np.ndarray) -> np.ndarray:  # window mean over covered pixels only
        return ndimage.gaussian_filter(x * covered, p["plane_window_sigma"]) / np.maximum(weight, 1e-6)

    ma, mb = mean(a), mean(b)
    cov, va, vb = mean(a * b) - ma * mb, mean(a * a) - ma**2, mean(b * b) - mb**2
    ncc = cov / np.sqrt(np.maximum(va * vb, 1e-10))
    return np.where(weight > 0.05, ncc, 0.0)


def on_plane(lafs1: np.ndarray, ncc: np.ndarray) -> np.ndarray:
    """Mask of image-1 frames whose centre and 8 points at 0.7 of their radius all have
    ``ncc`` >= ``min_plane_ncc`` (``ncc`` from ``plane_ncc``; outside the image counts as 0)."""
    from scipy import ndimage

    ring = [(0.0, 0.0)] + [(np.cos(a), np.sin(a)) for a in np.arange(8) * np.pi / 4]
    ok = np.ones(len(lafs1), bool)
    for u in ring:
        pts = lafs1[:, :, 2] + 0.7 * lafs1[:, :, :2] @ np.asarray(u)
        ok &= ndimage.map_coordinates(ncc, [pts[:, 1], pts[:, 0]], order=1, cval=0.0) >= PARAMS["min_plane_ncc"]
    return ok
