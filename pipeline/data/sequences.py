"""Patch pairs from image sequences with ground-truth homographies -> arrays or shards.

Layouts (one folder per sequence; images may be .png, .ppm, .pgm, .jpg, .tif or .bmp):

* HPatches full sequences (``hpatches-sequences-release/<seq>/``): ``1.ppm .. 6.ppm`` and
  ``H_1_2 .. H_1_6``;
* Oxford / VGG affine sequences (e.g. ``graf/``): ``img1.png .. img6.png`` and ``H1to2p .. H1to6p``;
* your own photos in either layout. A homography file is a plain-text 3x3 matrix mapping pixel
  coordinates (x, y, 1) of image 1 to image k.

Keypoints are detected in image 1 only, with a classical scale-space detector (kornia's
``ScaleSpaceDetector``: DoG response on ``ScalePyramid(3, 1.6, 32, double_image=True)``, 3-D quadratic
subpixel refinement, ``LAFOrienter(19)`` dominant orientation, frame radius 6 sigma: the SIFT-like
configuration of ``kornia.feature.SIFTFeatureScaleSpace``). Each local affine frame (LAF,
``[A | c]``: the patch samples c + A [-1, 1]^2) is carried into image k by the affine approximation
of the homography at its centre: c_k = H(c), A_k = J_H(c) A, with J_H the Jacobian of H at c. So the
image-k patch shows image k's own pixels (its blur, noise, lighting and the non-affine part of the
viewpoint change) rather than image k warped into image 1's frame. Frames of image k then get
detector-like noise (``PARAMS``: position, scale, orientation), as a detector run on image k would
not find exactly the mapped frame. Points whose frame (with room for that noise) leaves image k,
or whose frame leaves image 1, are dropped for that pair of images, and so are points where the
homography does not explain image k over the patch (``plane_ncc``: something in front of the plane,
like the car below graf's wall). ``redetect=True`` adds PhotoTour's criterion, that the detector
finds the point again in image k. Patches are sampled with
``kornia.feature.extract_patches_from_pyramid`` (from the pyramid level matching the frame's scale,
so large frames are not aliased).

Pairs: positive = a point's patch in image 1 vs its patch in image k; negative (eval) = a point's
patch in image 1 vs another point's patch in image k, the two points at least a frame radius apart
in image 1 so a negative never shows essentially the same content. Eval pairs are 50 % positive;
training pairs are all positive with every point at most once per block. Everything is seeded:
the same arguments give identical pairs. Ids: ``sequence_index << 32 | keypoint index``.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Literal, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from pipeline.data.shards import (finish_conversion, PairBlock, SourceError, block_sizes,
                                  write_split)

logger = logging.getLogger(__name__)

IMAGE_EXTS = (".png", ".ppm", ".pgm", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
ID_SHIFT = 32

# Everything that shapes the pairs; recorded in the manifest's generator section.
PARAMS: dict = {
    "detector": "kornia ScaleSpaceDetector(BlobDoG, ScalePyramid(3, 1.6, 32, double_image=True), "
                "ConvQuadInterp3d, LAFOrienter(19), minima_are_also_good=True)",
    "mr_size": 6.0,  # LAF radius (half the patch side) = mr_size x detection sigma
    "duplicate_distance": 0.5,  # x the larger radius: closer points of similar scale are one point
    "duplicate_scale_ratio": 1.5,
    "position_jitter": 0.05,  # x the frame radius, uniform per axis (about +-0.8 px of a 32 px patch)
    "scale_jitter": 0.1,  # log-uniform +-10 %
    "orientation_jitter_deg": 10.0,  # uniform
    "negative_min_distance": 1.0,  # x the larger radius, in image 1
    # A positive needs the homography to hold over the point's patch: image k, warped into image 1 by
    # H^-1, must correlate with image 1 (local NCC, Gaussian window, both blurred a little so that
    # resampling and focus differences do not count) at the frame's centre and at 8 points 0.7 of its
    # radius around it. Things off the plane fail it: graf's lower fifth is a car parked in front of
    # the wall (its roof and windows show the wall refracted and reflected), where the raw pairs are
    # not correspondences at all. On the wall (above y = 480 px) the median NCC is 0.998 for img2 and
    # 0.95 for img6 (60 degrees): a check of the ground truth, not of how hard a pair is.
    "plane_window_sigma": 12.0,  # px of image 1
    "plane_blur_sigma": 1.5,  # px of image 1, both images
    "min_plane_ncc": 0.5,
    # Optional (``redetect=True``), PhotoTour's criterion: the detector finds the point again in image
    # k, some detection whose region overlaps the mapped one with an overlap error (1 - intersection /
    # union) of at most this (Mikolajczyk & Schmid 2005; regions as circles of the frame's area), with
    # a similar orientation. It keeps only points DoG finds again, which leaves easier pairs (graf:
    # 1805 of 4257 plane-checked positives, mostly from img2-3); on its own it is no plane check, as
    # textured surfaces off the plane repeat detections by chance.
    "max_overlap_error": 0.5,
    "max_orientation_difference_deg": 30.0,  # and the same dominant orientation, within this
}


# --- layout ---------------------------------------------------------------------------------------

_LAYOUTS = {  # name: (image file regex, homography file name for image k)
    "hpatches": (re.compile(r"^(\d+)(\.[A-Za-z]+)$"), "H_1_{k}"),
    "oxford": (re.compile(r"^img(\d+)(\.[A-Za-z]+)$"), "H1to{k}p"),
}


@dataclass
class ImageSequence:
    """A sequence folder: its layout, image files by index, and homography file names."""

    path: Path
    layout: str
    images: dict[int, Path]

    def homography_path(self, k: int) -> Path:
        return self.path / _LAYOUTS[self.layout][1].format(k=k)


def _scan(path: Path) -> ImageSequence | None:
    if not path.is_dir():
        return None
    names = [p for p in path.iterdir() if p.is_file()]
    for layout, (pattern, _) in _LAYOUTS.items():
        found: dict[int, Path] = {}
        for p in sorted(names, key=lambda p: p.name):
            m = pattern.match(p.name)
            if m and m.group(2).lower() in IMAGE_EXTS:
                k = int(m.group(1))
                prev = found.get(k)
                if prev is None or IMAGE_EXTS.index(m.group(2).lower()) < IMAGE_EXTS.index(prev.suffix.lower()):
                    found[k] = p
        if 1 in found:
            return ImageSequence(path, layout, found)
    return None


def open_sequence(seq_dir: str | os.PathLike) -> ImageSequence:
    """Recognise a sequence folder (HPatches ``1.ppm``/``H_1_k`` or Oxford ``img1.png``/``H1tokp``)."""
    path = Path(seq_dir)
    if not path.is_dir():
        raise SourceError(f"{path}: sequence folder not found")
    seq = _scan(path)
    if seq is None:
        raise SourceError(f"{path}: not an image sequence: expected 1.ppm .. 6.ppm + H_1_2 .. H_1_6 (HPatches) or "
                          f"img1.png .. img6.png + H1to2p .. H1to6p (Oxford); a folder of sequences needs "
                          f"find_sequences / sequence_to_shards")
    return seq


def find_sequences(root: str | os.PathLike) -> list[Path]:
    """``root`` if it is a sequence, else its sub-folders that are sequences (sorted by name)."""
    root = Path(root)
    if not root.is_dir():
        raise SourceError(f"{root}: not found")
    if _scan(root) is not None:
        return [root]
    found = sorted(p for p in root.iterdir() if _scan(p) is not None)
    if not found:
        raise SourceError(f"{root}: neither an image sequence nor a folder of sequences (expected img1.png + H1to2p "
                          f"... or 1.ppm + H_1_2 ... in it or in its sub-folders)")
    return found


def read_homography(path: Path) -> np.ndarray:
    """A plain-text 3x3 homography (whitespace separated; HPatches H_1_k, Oxford H1tokp)."""
    try:
        text = path.read_text(encoding="ascii", errors="replace")
    except FileNotFoundError:
        raise SourceError(f"{path}: homography file not found") from None
    try:
        vals = np.array([float(v) for v in text.split()], np.float64)
    except ValueError:
        raise SourceError(f"{path}: expected 9 numbers (a 3x3 homography), found non-numeric text") from None
    if vals.size != 9 or not np.isfinite(vals).all():
        raise SourceError(f"{path}: expected 9 finite numbers (a 3x3 homography), got {vals.size}")
    h = vals.reshape(3, 3)
    if abs(np.linalg.det(h)) < 1e-12:
        raise SourceError(f"{path}: singular homography")
    return h


def read_image(path: Path) -> np.ndarray:
    """Grayscale float32 (H, W) in [0, 1]."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    except OSError as e:
        raise SourceError(f"{path}: not a readable image ({e})") from None


def _targets(seq: ImageSequence, targets: Sequence[int] | None) -> list[int]:
    if targets is None:
        ks = sorted(k for k in seq.images if k != 1)
        if not ks:
            raise SourceError(f"{seq.path}: only image 1 found; a sequence needs images 2.. and their homographies")
        return ks
    ks = list(targets)
    for k in ks:
        if k == 1 or k < 1:
            raise ValueError(f"targets must be image indices >= 2, got {k}")
        if k not in seq.images:
            name = f"{k}.ppm" if seq.layout == "hpatches" else f"img{k}.png"
            raise SourceError(f"{seq.path / name}: target image {k} not found")
    return ks


# --- frames ---------------------------------------------------------------------------------------

def _to_tensor(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img))[None, None]


def detect_frames(img: np.ndarray, max_keypoints: int = 2000) -> np.ndarray:
    """LAFs float64 (n, 2, 3) in pixels of the strongest DoG keypoints of ``img`` (H, W) in [0, 1],
    strongest first, near-duplicates (same place, similar scale) and frames leaving the image removed."""
    import kornia.feature as KF
    from kornia.geometry.subpix import ConvQuadInterp3d
    from kornia.geometry.transform import ScalePyramid

    detector = KF.ScaleSpaceDetector(
        max_keypoints, mr_size=PARAMS["mr_size"], resp_module=KF.BlobDoG(), subpix_module=ConvQuadInterp3d(),
        scale_pyr_module=ScalePyramid(3, 1.6, 32, double_image=True), ori_module=KF.LAFOrienter(19),
        scale_space_response=True, minima_are_also_good=True)
    with torch.no_grad():
        lafs, resp = detector(_to_tensor(img))
    lafs, resp = lafs[0].double().numpy(), resp[0].abs().double().numpy()
    filled = np.abs(lafs).reshape(len(lafs), -1).sum(1) > 0
    lafs, resp = lafs[filled], resp[filled]
    lafs = lafs[np.argsort(-resp, kind="stable")]
    lafs = lafs[frames_inside(lafs, img.shape)]
    return _drop_duplicates(lafs)


def circle_overlap_error(d: np.ndarray, r1: np.ndarray, r2: np.ndarray) -> np.ndarray:
    """1 - |A & B| / |A | B| of discs of radii r1, r2 whose centres are d apart (broadcast)."""
    d, r1, r2 = np.broadcast_arrays(np.asarray(d, np.float64), np.asarray(r1, np.float64), np.asarray(r2, np.float64))
    small, big = np.minimum(r1, r2), np.maximum(r1, r2)
    inter = np.where(d <= big - small, np.pi * small**2, 0.0)
    lens = (d > big - small) & (d < big + small)
    if lens.any():
        dd, a, b = d[lens], r1[lens], r2[lens]
        alpha = np.arccos(np.clip((dd**2 + a**2 - b**2) / (2 * dd * a), -1, 1))
        beta = np.arccos(np.clip((dd**2 + b**2 - a**2) / (2 * dd * b), -1, 1))
        inter[lens] = a**2 * alpha + b**2 * beta - 0.5 * np.sqrt(np.clip(
            (-dd + a + b) * (dd + a - b) * (dd - a + b) * (dd + a + b), 0, None))
    union = np.pi * (r1**2 + r2**2) - inter
    return 1.0 - inter / union


def redetected(mapped: np.ndarray, found: np.ndarray) -> np.ndarray:
    """Mask of ``mapped`` frames (n, 2, 3) that some frame of ``found`` repeats: overlap error of
    their regions at most ``PARAMS["max_overlap_error"]``."""
    if len(found) == 0:
        return np.zeros(len(mapped), bool)
    from scipy.spatial import cKDTree

    r_map, r_found = laf_scale(mapped), laf_scale(found)
    a_map, a_found = laf_angle(mapped), laf_angle(found)
    max_turn = np.deg2rad(PARAMS["max_orientation_difference_deg"])
    tree = cKDTree(found[:, :, 2])
    ok = np.zeros(len(mapped), bool)
    for i, near in enumerate(tree.query_ball_point(mapped[:, :, 2], r_map + r_found.max())):
        if near:
            d = np.linalg.norm(found[near, :, 2] - mapped[i, :, 2], axis=1)
            turn = np.abs(np.angle(np.exp(1j * (a_found[near] - a_map[i]))))
            ok[i] = bool(((circle_overlap_error(d, r_map[i], r_found[near]) <= PARAMS["max_overlap_error"])
                          & (turn <= max_turn)).any())
    return ok


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


def laf_angle(lafs: np.ndarray) -> np.ndarray:
    """Direction (radians) of each frame's first axis, kornia's ``get_laf_orientation`` convention."""
    return np.arctan2(lafs[:, 0, 1], lafs[:, 0, 0])


def laf_scale(lafs: np.ndarray) -> np.ndarray:
    return np.sqrt(np.abs(np.linalg.det(lafs[:, :, :2])))


def _drop_duplicates(lafs: np.ndarray) -> np.ndarray:
    c, s = lafs[:, :, 2], laf_scale(lafs)
    keep: list[int] = []
    for i in range(len(lafs)):
        if keep:
            k = np.asarray(keep)
            big = np.maximum(s[k], s[i])
            near = np.linalg.norm(c[k] - c[i], axis=1) < PARAMS["duplicate_distance"] * big
            similar = big / np.minimum(s[k], s[i]) < PARAMS["duplicate_scale_ratio"]
            if (near & similar).any():
                continue
        keep.append(i)
    return lafs[np.asarray(keep, dtype=np.int64)]


def frames_inside(lafs: np.ndarray, shape: tuple[int, int], grow: float = 1.0, margin: np.ndarray | float = 0.0
                  ) -> np.ndarray:
    """Mask of frames whose patch square c + grow * A [-1, 1]^2 (plus ``margin`` px) lies inside an
    image of ``shape`` (H, W), pixel centres at integers."""
    h, w = shape
    corners = np.array([[1, 1], [1, -1], [-1, 1], [-1, -1]], np.float64) * grow
    pts = lafs[:, None, :, 2] + np.einsum("nij,cj->nci", lafs[:, :, :2], corners)
    m = np.asarray(margin, np.float64).reshape(-1, 1)
    ok = (pts[..., 0] >= m) & (pts[..., 0] <= w - 1 - m) & (pts[..., 1] >= m) & (pts[..., 1] <= h - 1 - m)
    return ok.all(1) & np.isfinite(pts).all((1, 2))


def map_frames(lafs: np.ndarray, hom: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Carry LAFs of image 1 into image k: (lafs_k (n, 2, 3), ok (n,)).

    Centre c -> H(c); axes A -> J A with J = d H(x) / dx at c, the affine approximation of H there.
    ``ok`` is False where the point maps to or behind the line at infinity (w <= 0).
    """
    c = lafs[:, :, 2]
    x = np.c_[c, np.ones(len(c))] @ hom.T
    w = x[:, 2]
    ok = w > 1e-9
    wsafe = np.where(ok, w, 1.0)
    ck = x[:, :2] / wsafe[:, None]
    # J = (H[:2, :2] - H(c) outer H[2, :2]) / w
    jac = (hom[None, :2, :2] - ck[:, :, None] * hom[None, 2:3, :2]) / wsafe[:, None, None]
    out = np.concatenate([jac @ lafs[:, :, :2], ck[:, :, None]], 2)
    return out, ok


def jitter_frames(lafs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Detector-like noise on frames: centre shift, log-uniform scale, rotation (``PARAMS``)."""
    n = len(lafs)
    p = PARAMS
    s = laf_scale(lafs)
    shift = rng.uniform(-p["position_jitter"], p["position_jitter"], (n, 2)) * s[:, None]
    sj = np.exp(rng.uniform(-np.log1p(p["scale_jitter"]), np.log1p(p["scale_jitter"]), n))
    th = np.deg2rad(rng.uniform(-p["orientation_jitter_deg"], p["orientation_jitter_deg"], n))
    rot = np.stack([np.stack([np.cos(th), -np.sin(th)], -1), np.stack([np.sin(th), np.cos(th)], -1)], -2)
    out = lafs.copy()
    out[:, :, :2] = (lafs[:, :, :2] @ rot) * sj[:, None, None]
    out[:, :, 2] += shift
    return out


def _jitter_room() -> tuple[float, float]:
    """(grow, margin per unit scale) that contain any jittered frame's square."""
    p = PARAMS
    th = np.deg2rad(p["orientation_jitter_deg"])
    return (1 + p["scale_jitter"]) * (np.cos(th) + np.sin(th)), p["position_jitter"] * np.sqrt(2)


def extract(img: torch.Tensor, lafs: np.ndarray, patch_size: int) -> np.ndarray:
    """uint8 (n, P, P) patches of ``lafs`` (pixels) from ``img`` (1, 1, H, W) in [0, 1]."""
    import kornia.feature as KF

    if len(lafs) == 0:
        return np.zeros((0, patch_size, patch_size), np.uint8)
    with torch.no_grad():
        p = KF.extract_patches_from_pyramid(img, torch.from_numpy(lafs).float()[None], PS=patch_size)
    return np.clip(np.floor(p[0, :, 0].numpy() * 255.0 + 0.5), 0, 255).astype(np.uint8)


# --- per-sequence correspondences -----------------------------------------------------------------

@dataclass
class Correspondences:
    name: str
    lafs1: np.ndarray  # (n, 2, 3)
    patches1: np.ndarray  # uint8 (n, P, P), image 1, no jitter
    targets: list[int]
    images: dict[int, torch.Tensor]  # target -> (1, 1, H, W)
    lafs: dict[int, np.ndarray]  # target -> mapped frames (n, 2, 3)
    valid: dict[int, np.ndarray]  # target -> bool (n,)

    def candidates(self) -> tuple[np.ndarray, np.ndarray]:
        """All (point, target) with the point valid in the target: (points, targets), target-major."""
        pts = [np.flatnonzero(self.valid[k]) for k in self.targets]
        return np.concatenate(pts), np.concatenate([np.full(len(p), k) for p, k in zip(pts, self.targets)])

    def patches_k(self, points: np.ndarray, targets: np.ndarray, rng: np.random.Generator,
                  patch_size: int) -> np.ndarray:
        """Jittered image-k patches of ``points`` (each in its ``targets`` image)."""
        out = np.empty((len(points), patch_size, patch_size), np.uint8)
        jittered = jitter_frames(self.lafs_of(points, targets), rng)
        for k in self.targets:
            m = targets == k
            if m.any():
                out[m] = extract(self.images[k], jittered[m], patch_size)
        return out

    def lafs_of(self, points: np.ndarray, targets: np.ndarray) -> np.ndarray:
        out = np.empty((len(points), 2, 3))
        for k in self.targets:
            m = targets == k
            out[m] = self.lafs[k][points[m]]
        return out


def _correspondences(seq: ImageSequence, targets: Sequence[int] | None, patch_size: int,
                     max_keypoints: int, redetect: bool = False) -> Correspondences:
    ks = _targets(seq, targets)
    homs = {k: read_homography(seq.homography_path(k)) for k in ks}  # all H files checked before any work
    img1 = read_image(seq.images[1])
    return correspondences(seq.path.name, img1, {k: read_image(seq.images[k]) for k in ks}, homs, patch_size,
                           max_keypoints, source=seq.images[1], redetect=redetect)


def correspondences(name: str, img1: np.ndarray, images: dict[int, np.ndarray], homs: dict[int, np.ndarray],
                    patch_size: int, max_keypoints: int, source: object = None, plane_check: bool = True,
                    redetect: bool = False) -> Correspondences:
    """Keypoints detected in ``img1`` and their frames in each image k of ``images`` (``homs[k]``
    maps image 1 to image k): the one construction behind real and synthetic sequence pairs.
    ``plane_check``: a point counts in image k only where the homography explains image k over its
    patch (``plane_ncc``; real photographs: H holds on one plane only); synthetic views, exact
    everywhere, skip it. ``redetect``: also require the detector to find the point again in image k
    (PhotoTour's criterion, ``redetected``)."""
    lafs1 = detect_frames(img1, max_keypoints)
    if len(lafs1) == 0:
        raise SourceError(f"{source or name}: no keypoints detected")
    grow, margin = _jitter_room()
    tensors, lafs, valid = {}, {}, {}
    inside = off_plane = 0
    for k, img in images.items():
        mapped, ok = map_frames(lafs1, homs[k])
        ok &= frames_inside(mapped, img.shape, grow, margin * laf_scale(mapped))
        if plane_check:
            kept = ok & on_plane(lafs1, plane_ncc(img1, img, homs[k]))
            inside, off_plane = inside + int(ok.sum()), off_plane + int((ok & ~kept).sum())
            ok = kept
        if redetect:
            ok &= redetected(mapped, detect_frames(img, 2 * max_keypoints))
        tensors[k], lafs[k], valid[k] = _to_tensor(img), mapped, ok
    if plane_check:  # a large share means a sequence with much off the plane, or a wrong H file
        logger.info("%s: %d of %d (point, image) correspondences left out where the homography does not hold",
                    name, off_plane, inside)
    patches1 = extract(_to_tensor(img1), lafs1, patch_size)
    return Correspondences(name, lafs1, patches1, list(images), tensors, lafs, valid)


def _negative_partners(cor: Correspondences, anchors: np.ndarray, targets: np.ndarray,
                       rng: np.random.Generator) -> np.ndarray:
    """For each anchor (valid in its target) another point valid in that target, far from it in image 1."""
    c, s = cor.lafs1[:, :, 2], laf_scale(cor.lafs1)
    partner = np.full(len(anchors), -1)
    for k in cor.targets:
        idx = np.flatnonzero(targets == k)
        pool = np.flatnonzero(cor.valid[k])
        todo = idx
        for _ in range(64):  # rejection sampling; almost always done in one or two rounds
            if todo.size == 0:
                break
            draw = pool[rng.integers(0, len(pool), todo.size)]
            a = anchors[todo]
            far = np.linalg.norm(c[draw] - c[a], axis=1) >= PARAMS["negative_min_distance"] * np.maximum(s[draw], s[a])
            partner[todo[far]] = draw[far]
            todo = todo[~far]
        for t in todo:  # the rare leftovers: choose among all far points explicitly
            a = anchors[t]
            far = pool[np.linalg.norm(c[pool] - c[a], axis=1) >= PARAMS["negative_min_distance"]
                       * np.maximum(s[pool], s[a])]
            if far.size == 0:
                raise SourceError(f"{cor.name}: no point far enough from keypoint {a} for a negative pair in image {k}")
            partner[t] = far[rng.integers(0, far.size)]
    return partner


def eval_pairs(cor: Correspondences, n_pairs: int | None, rng: np.random.Generator, patch_size: int,
               id_base: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pts, tgt = cor.candidates()
    if pts.size == 0:
        raise SourceError(f"{cor.name}: no keypoint of image 1 stays inside any target image")
    if n_pairs is None:
        n_pos = n_neg = pts.size
    else:
        n_pos, n_neg = n_pairs // 2, n_pairs - n_pairs // 2
        if n_pos > pts.size:
            raise SourceError(f"{cor.name}: {n_pairs} pairs need {n_pos} positive correspondences but only {pts.size} "
                              f"exist (raise max_keypoints or ask for at most {2 * pts.size} pairs)")
    pos = rng.choice(pts.size, n_pos, replace=False) if n_pairs is not None else np.arange(pts.size)
    neg = rng.choice(pts.size, n_neg, replace=n_neg > pts.size)
    partner = _negative_partners(cor, pts[neg], tgt[neg], rng)
    first = np.concatenate([pts[pos], pts[neg]])
    second = np.concatenate([pts[pos], partner])
    targets = np.concatenate([tgt[pos], tgt[neg]])
    pairs = np.stack([cor.patches1[first], cor.patches_k(second, targets, rng, patch_size)], 1)
    labels = np.concatenate([np.ones(n_pos, np.uint8), np.zeros(n_neg, np.uint8)])
    ids = np.stack([first, second], 1).astype(np.int64) + id_base
    order = rng.permutation(len(labels))
    return pairs[order], labels[order], ids[order]


def _train_pairs(cor: Correspondences, n_pairs: int | None, offset: int, pairs_per_block: int,
                 rng: np.random.Generator, patch_size: int, id_base: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All-positive pairs; ``offset`` = position of the first pair in the split, so that every
    (global) block gets distinct points."""
    pts, tgt = cor.candidates()
    usable = np.unique(pts)
    if usable.size == 0:
        raise SourceError(f"{cor.name}: no keypoint of image 1 stays inside any target image")
    n = pts.size if n_pairs is None else n_pairs
    head = min(n, (-offset) % pairs_per_block) if offset % pairs_per_block else 0
    sizes = ([head] if head else []) + (block_sizes(n - head, pairs_per_block) if n > head else [])
    if max(sizes) > usable.size:
        raise SourceError(f"{cor.name}: a block of {max(sizes)} pairs needs that many distinct points but only "
                          f"{usable.size} are usable; lower pairs_per_block")
    points, targets = [], []
    for size in sizes:
        p = usable[rng.choice(usable.size, size, replace=False)]
        # a random target among those the point is valid in
        valid = np.stack([cor.valid[k][p] for k in cor.targets], 1)
        r = rng.random(valid.shape) * valid
        targets.append(np.asarray(cor.targets)[r.argmax(1)])
        points.append(p)
    p, t = np.concatenate(points), np.concatenate(targets)
    pairs = np.stack([cor.patches1[p], cor.patches_k(p, t, rng, patch_size)], 1)
    ids = np.stack([p, p], 1).astype(np.int64) + id_base
    return pairs, np.ones(n, np.uint8), ids


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, 0 if split == "train" else 1, index]))


def sequence_pairs(seq_dir: str | os.PathLike, *, n_pairs: int | None = None, targets: Sequence[int] | None = None,
                   seed: int = 0, patch_size: int = 32, max_keypoints: int = 2000, redetect: bool = False,
                   progress: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labelled eval pairs: (pairs uint8 (N, 2, P, P), labels uint8 (N,), ids int64 (N, 2)).

    ``seq_dir``: one sequence folder, or a folder of sequences (all of them, in name order, ids
    ``sequence_index << 32 | keypoint``). ``n_pairs``: pairs per sequence, half positive (default:
    every correspondence once as a positive plus as many negatives). ``targets``: image indices
    paired with image 1 (default all, e.g. 2..6). ``redetect``: positives only where the detector
    finds the point again in image k (PhotoTour's criterion; easier pairs). Identical output for
    identical arguments: the same pairs ``sequence_to_shards(seq_dir, ..., split="eval")`` writes.
    """
    _check(patch_size, max_keypoints, n_pairs, 2)
    dirs = find_sequences(seq_dir) if _scan(Path(seq_dir)) is None else [Path(seq_dir)]
    seqs = [open_sequence(d) for d in dirs]
    out = []
    for i, seq in enumerate(tqdm(seqs, desc="sequences eval", unit="seq", disable=not progress, file=sys.stderr)):
        cor = _correspondences(seq, targets, patch_size, max_keypoints, redetect)
        out.append(eval_pairs(cor, n_pairs, _rng(seed, "eval", i), patch_size, i << ID_SHIFT))
    if len(out) == 1:
        return out[0]
    return tuple(np.concatenate([o[j] for o in out]) for j in range(3))  # type: ignore[return-value]


def _check(patch_size: int, max_keypoints: int, n_pairs: int | None, min_pairs: int) -> None:
    if not 8 <= patch_size <= 256:
        raise ValueError(f"patch_size must be in 8..256, got {patch_size}")
    if max_keypoints < 1:
        raise ValueError(f"max_keypoints must be >= 1, got {max_keypoints}")
    if n_pairs is not None and n_pairs < min_pairs:
        raise ValueError(f"need at least {min_pairs} pairs, got {n_pairs}")


def _rebatch(chunks: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]], k: int) -> Iterator[PairBlock]:
    """Concatenate per-sequence arrays and cut them into blocks of exactly k (the last may be short)."""
    buf: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    held = 0
    for chunk in chunks:
        buf.append(chunk)
        held += len(chunk[1])
        if held >= k:
            pairs, labels, ids = (np.concatenate([c[i] for c in buf]) for i in range(3))
            n_full = held // k * k
            for i in range(0, n_full, k):
                yield PairBlock(pairs[i : i + k], labels[i : i + k], ids[i : i + k])
            buf = [(pairs[n_full:], labels[n_full:], ids[n_full:])] if held > n_full else []
            held -= n_full
    if held:
        pairs, labels, ids = (np.concatenate([c[i] for c in buf]) for i in range(3))
        yield PairBlock(pairs, labels, ids)


def _as_dirs(dirs: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    items = [dirs] if isinstance(dirs, (str, os.PathLike)) else list(dirs)
    out: list[Path] = []
    for d in items:
        out.extend(find_sequences(d))
    return out


def sequence_to_shards(seq_dirs: str | os.PathLike | Iterable[str | os.PathLike], out_dir: str | os.PathLike, *,
                       split: Literal["train", "eval", "both"] = "eval",
                       eval_dirs: str | os.PathLike | Iterable[str | os.PathLike] | None = None,
                       pairs_per_sequence: int | None = None, targets: Sequence[int] | None = None, seed: int = 0,
                       patch_size: int = 32, max_keypoints: int = 2000, pairs_per_block: int = 256,
                       blocks_per_shard: int = 8, redetect: bool = False, progress: bool = True) -> dict:
    """Write shards (+ manifest.json) of pairs from image sequences to ``out_dir``; return the manifest.

    ``seq_dirs``: sequence folders, or folders of them (e.g. hpatches-sequences-release/), for
    ``split`` "train" or "eval"; with "both", ``seq_dirs`` feed train and ``eval_dirs`` (required,
    disjoint) feed eval. ``pairs_per_sequence``: default every correspondence once (eval adds as many
    negatives). Train pairs are all positive, a point at most once per block. ``redetect``: as in
    ``sequence_pairs``.
    """
    if split not in ("train", "eval", "both"):
        raise ValueError(f"split must be 'train', 'eval' or 'both', got {split!r}")
    _check(patch_size, max_keypoints, pairs_per_sequence, 1 if split == "train" else 2)
    if pairs_per_block < 1 or blocks_per_shard < 1:
        raise ValueError(f"bad pairs_per_block/blocks_per_shard: {pairs_per_block}, {blocks_per_shard}")
    if split == "both" and eval_dirs is None:
        raise ValueError("split='both' needs eval_dirs (sequences for eval, disjoint from seq_dirs)")
    if split != "both" and eval_dirs is not None:
        raise ValueError(f"eval_dirs is only used with split='both' (got split={split!r})")
    lists = ({"train": _as_dirs(seq_dirs), "eval": _as_dirs(eval_dirs)} if split == "both"
             else {split: _as_dirs(seq_dirs)})
    if split == "both":
        shared = {p.resolve() for p in lists["train"]} & {p.resolve() for p in lists["eval"]}
        if shared:
            raise ValueError(f"sequences in both train and eval: {sorted(map(str, shared))[:3]}")
    seqs = {s: [open_sequence(d) for d in dirs] for s, dirs in lists.items()}
    for ss in seqs.values():  # fail on a missing image / H file before the slow part
        for q in ss:
            for k in _targets(q, targets):
                if not q.homography_path(k).is_file():
                    raise SourceError(f"{q.homography_path(k)}: homography file not found")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)
    common = {"name": "pipeline.data.sequences", "seed": seed, "patch_size": patch_size,
              "pairs_per_block": pairs_per_block, "blocks_per_shard": blocks_per_shard,
              "max_keypoints": max_keypoints, "redetect": redetect, "targets": list(targets) if targets is not None else "all",
              "pairs_per_sequence": pairs_per_sequence, "id": f"sequence_index << {ID_SHIFT} | keypoint index",
              **PARAMS}
    per_split: dict[str, dict] = {}
    splits = {}
    index = 0
    for s, ss in seqs.items():
        first_index = index
        index += len(ss)
        per_split[s] = {"sequences": [str(q.path.resolve()) for q in ss], "first_sequence_index": first_index}
        counts: list[int] = []

        def chunks(s: str = s, ss: list[ImageSequence] = ss, first_index: int = first_index,
                   counts: list[int] = counts) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
            offset = 0
            for i, q in enumerate(tqdm(ss, desc=f"sequences {s}", unit="seq", disable=not progress,
                                       file=sys.stderr)):
                cor = _correspondences(q, targets, patch_size, max_keypoints, redetect)
                rng, base = _rng(seed, s, i), (first_index + i) << ID_SHIFT
                arrays = (_train_pairs(cor, pairs_per_sequence, offset, pairs_per_block, rng, patch_size, base)
                          if s == "train" else eval_pairs(cor, pairs_per_sequence, rng, patch_size, base))
                offset += len(arrays[1])
                counts.append(len(arrays[1]))
                yield arrays

        splits[s] = write_split(out, s, _rebatch(chunks(), pairs_per_block), blocks_per_shard, progress=progress,
                                params={**common, s: per_split[s]})
        per_split[s]["pairs_per_sequence"] = counts
    return finish_conversion(out, source="sequences", patch_size=patch_size, pairs_per_block=pairs_per_block,
                             generator={**common, **per_split}, splits=splits)


__all__ = ["PARAMS", "Correspondences", "correspondences", "detect_frames", "eval_pairs", "extract", "find_sequences",
           "frames_inside", "jitter_frames", "map_frames",
           "open_sequence", "read_homography", "sequence_pairs", "sequence_to_shards"]
