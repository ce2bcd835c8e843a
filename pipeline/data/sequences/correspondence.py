"""Per-sequence correspondences: keypoints of image 1, their frames carried into each image k, and
which (point, image) pairs are valid (inside, on the homography's plane, optionally re-detected)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from pipeline.data.sequences.constructions import CONSTRUCTIONS, DEFAULT, Construction, get_construction
from pipeline.data.sequences.detection import best_redetection, on_plane, plane_ncc, redetected
from pipeline.data.sequences.frames import _to_tensor, extract, frames_inside, laf_scale
from pipeline.data.sequences.layout import ImageSequence, _targets, read_homography, read_image
from pipeline.data.shards import SourceError

logger = logging.getLogger(__name__)


@dataclass
class Correspondences:
    name: str
    lafs1: np.ndarray  # (n, 2, 3)
    patches1: np.ndarray  # uint8 (n, P, P), image 1, no jitter
    targets: list[int]
    images: dict[int, torch.Tensor]  # target -> (1, 1, H, W)
    lafs: dict[int, np.ndarray]  # target -> mapped frames (n, 2, 3); "detected": the chosen detections
    valid: dict[int, np.ndarray]  # target -> bool (n,)
    construction: Construction = CONSTRUCTIONS[DEFAULT]  # how image-k frames are jittered

    def candidates(self) -> tuple[np.ndarray, np.ndarray]:
        """All (point, target) with the point valid in the target: (points, targets), target-major."""
        pts = [np.flatnonzero(self.valid[k]) for k in self.targets]
        return np.concatenate(pts), np.concatenate([np.full(len(p), k) for p, k in zip(pts, self.targets)])

    def patches_k(self, points: np.ndarray, targets: np.ndarray, rng: np.random.Generator,
                  patch_size: int) -> np.ndarray:
        """Jittered image-k patches of ``points`` (each in its ``targets`` image)."""
        out = np.empty((len(points), patch_size, patch_size), np.uint8)
        jittered = self.target_frames(points, targets, rng)
        for k in self.targets:
            m = targets == k
            if m.any():
                out[m] = extract(self.images[k], jittered[m], patch_size)
        return out

    def target_frames(self, points: np.ndarray, targets: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The image-k frames (n, 2, 3) the patches of ``points`` are cut from: exact frames, jittered."""
        return self.construction.jitter_frames(self.lafs_of(points, targets), rng)

    def lafs_of(self, points: np.ndarray, targets: np.ndarray) -> np.ndarray:
        out = np.empty((len(points), 2, 3))
        for k in self.targets:
            m = targets == k
            out[m] = self.lafs[k][points[m]]
        return out


def _correspondences(seq: ImageSequence, targets: Sequence[int] | None, patch_size: int,
                     max_keypoints: int, redetect: bool = False,
                     construction: str | Construction = DEFAULT) -> Correspondences:
    ks = _targets(seq, targets)
    homs = {k: read_homography(seq.homography_path(k)) for k in ks}  # all H files checked before any work
    img1 = read_image(seq.images[1])
    return correspondences(seq.path.name, img1, {k: read_image(seq.images[k]) for k in ks}, homs, patch_size,
                           max_keypoints, source=seq.images[1], redetect=redetect, construction=construction)


def correspondences(name: str, img1: np.ndarray, images: dict[int, np.ndarray], homs: dict[int, np.ndarray],
                    patch_size: int, max_keypoints: int, source: object = None, plane_check: bool = True,
                    redetect: bool = False, construction: str | Construction = DEFAULT,
                    min_patch_std: float = 0.0) -> Correspondences:
    """Keypoints detected in ``img1`` and their frames in each image k of ``images`` (``homs[k]``
    maps image 1 to image k): the one code path behind real and synthetic sequence pairs, for every
    ``construction`` (a name of ``CONSTRUCTIONS``: detector, orientation, image-k frame, jitter).
    ``plane_check``: a point counts in image k only where the homography explains image k over its
    patch (``plane_ncc``; real photographs: H holds on one plane only); synthetic views, exact
    everywhere, skip it. ``redetect``: also require the detector to find the point again in image k
    (PhotoTour's criterion, ``redetected``). A ``detected`` construction's image-k frame is image k's
    own detection that best repeats the carried frame (``best_redetection``); points without one, or
    whose detection lacks the room ``room()`` asks for inside image k, are no positives there.
    ``min_patch_std``: a contrast threshold, as detectors have (OpenCV SIFT's on the DoG value; kornia's
    ScaleSpaceDetector has none): keypoints whose image-1 patch has an intensity std (in [0, 1]) below
    it are dropped, since a nearly flat patch is sensor noise and quantisation, not a point to match."""
    how = get_construction(construction)
    lafs1 = how.detect(img1, max_keypoints)
    if len(lafs1) == 0:
        raise SourceError(f"{source or name}: no keypoints detected")
    patches1 = extract(_to_tensor(img1), lafs1, patch_size)
    if min_patch_std > 0:
        contrasted = (patches1.reshape(len(patches1), -1) / 255.0).std(1) >= min_patch_std
        lafs1, patches1 = lafs1[contrasted], patches1[contrasted]
        if len(lafs1) == 0:
            raise SourceError(f"{source or name}: no keypoint's patch has an intensity std of at least "
                              f"{min_patch_std:g} (of full scale 1): the image is flat")
    grow, margin = how.room()
    tensors, lafs, valid = {}, {}, {}
    inside = off_plane = 0
    for k, img in images.items():
        mapped, ok = how.carry(lafs1, homs[k])
        found = how.detect(img, 2 * max_keypoints) if (redetect or how.detected) else None
        if how.detected:  # the frame cut in image k is the detection, so it is the one that must fit there
            best = np.full(len(mapped), -1, np.int64)
            best[ok] = best_redetection(mapped[ok], found)  # frames behind the camera have no centre
            ok &= best >= 0
            mapped = mapped.copy()
            mapped[ok] = found[best[ok]]
        ok &= frames_inside(mapped, img.shape, grow, margin * laf_scale(mapped))
        if plane_check:
            kept = ok & on_plane(lafs1, plane_ncc(img1, img, homs[k]))
            inside, off_plane = inside + int(ok.sum()), off_plane + int((ok & ~kept).sum())
            ok = kept
        if redetect and not how.detected:  # "detected" frames are re-detections already
            ok &= redetected(mapped, found)
        tensors[k], lafs[k], valid[k] = _to_tensor(img), mapped, ok
    if plane_check:  # a large share means a sequence with much off the plane, or a wrong H file
        logger.info("%s: %d of %d (point, image) correspondences left out where the homography does not hold",
                    name, off_plane, inside)
    return Correspondences(name, lafs1, patches1, list(images), tensors, lafs, valid, how)
