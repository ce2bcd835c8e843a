"""Image matching on sequences with ground-truth homographies: the HPatches-sequences protocol of
D2-Net (Dusmanu et al. 2019) and later papers, with patch descriptors.

For each sequence, DoG keypoints (``pipeline.data.sequences.detect_frames``: oriented frames, radius
6 sigma) are detected in image 1 and in every image k >= 2 on their own; their patches are cut
(``extract``) and described once per model. Descriptors of image 1 and image k are matched by
mutual nearest neighbours (L2); a match is correct at threshold t when image k's keypoint lies
within t pixels of image 1's keypoint mapped through the ground-truth homography. Per image pair:
the mean matching accuracy (correct / matches; 0 for a pair without matches, as D2-Net counts it)
at t = 1..10 px and the number of matches; these are averaged over all pairs. Homography accuracy
(SuperPoint's measure): a homography is fitted to the matches with kornia's RANSAC, and the pair
counts as correct at eps when the four corners of image 1 mapped by it and by the ground truth are
on average within eps pixels (a failed fit counts as wrong at every eps).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from pipeline.data.sequences import detect_frames, extract, open_sequence, read_homography, read_image
from pipeline.data.shards import SourceError
from pipeline.device import DevicePlan
from pipeline.evaluate import describe
from pipeline.protocols.common import is_pair_classifier, metric_key, on_device, text_table, with_sift

MMA_THRESHOLDS = tuple(range(1, 11))
HOMOGRAPHY_THRESHOLDS = (1, 3, 5, 10)
RANSAC_THRESHOLD = 3.0  # px, one-way transfer error (cv2.findHomography's usual 3)
MAX_KEYPOINTS = 2000


def mutual_nearest_neighbours(desc1: np.ndarray, desc2: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """int64 (M, 2) index pairs (i, j): j is i's L2 nearest neighbour in ``desc2`` and i is j's in
    ``desc1`` (argmin ties to the lowest index), in increasing i."""
    a = np.asarray(desc1, np.float64)
    b = np.asarray(desc2, np.float64)
    if len(a) == 0 or len(b) == 0:
        return np.zeros((0, 2), np.int64)
    nn12 = np.empty(len(a), np.int64)
    best21 = np.full(len(b), np.inf)
    nn21 = np.zeros(len(b), np.int64)
    bb = (b * b).sum(1)
    for s in range(0, len(a), chunk):
        x = a[s : s + chunk]
        sq = np.maximum((x * x).sum(1)[:, None] + bb[None, :] - 2.0 * x @ b.T, 0.0)
        nn12[s : s + chunk] = sq.argmin(1)
        col = sq.argmin(0)
        val = sq[col, np.arange(len(b))]
        better = val < best21  # strict: an earlier chunk keeps its (lower) index on ties
        best21[better], nn21[better] = val[better], col[better] + s
    i = np.arange(len(a))
    mutual = nn21[nn12] == i
    return np.stack([i[mutual], nn12[mutual]], 1)


def project(points: np.ndarray, hom: np.ndarray) -> np.ndarray:
    """(n, 2) pixel points through a 3x3 homography."""
    x = np.c_[points, np.ones(len(points))] @ np.asarray(hom, np.float64).T
    return x[:, :2] / x[:, 2:]


def reprojection_errors(kp1: np.ndarray, kp2: np.ndarray, matches: np.ndarray, hom: np.ndarray) -> np.ndarray:
    """Distance (px) between image k's matched keypoint and image 1's keypoint mapped by ``hom``."""
    return np.linalg.norm(kp2[matches[:, 1]] - project(kp1[matches[:, 0]], hom), axis=1)


def corner_error(hom_est: np.ndarray | None, hom_gt: np.ndarray, shape: tuple[int, int]) -> float:
    """Mean distance of image 1's four corners mapped by the estimate and by the ground truth
    (``inf`` without an estimate)."""
    if hom_est is None:
        return float("inf")
    h, w = shape
    corners = np.array([[0, 0], [0, h - 1], [w - 1, 0], [w - 1, h - 1]], np.float64)
    err = np.linalg.norm(project(corners, hom_est) - project(corners, hom_gt), axis=1).mean()
    return float(err) if np.isfinite(err) else float("inf")


def estimate_homography(pts1: np.ndarray, pts2: np.ndarray, threshold: float = RANSAC_THRESHOLD, seed: int = 0
                        ) -> np.ndarray | None:
    """kornia's RANSAC homography from matched points (n, 2) -> (n, 2); None when it finds none."""
    from kornia.geometry.ransac import RANSAC

    if len(pts1) < 4:
        return None
    with torch.no_grad():
        hom, _ = RANSAC("homography", inl_th=threshold, seed=seed)(torch.from_numpy(pts1).double(),
                                                                    torch.from_numpy(pts2).double())
    hom = hom.numpy()
    if not np.isfinite(hom).all() or abs(hom).sum() == 0 or abs(np.linalg.det(hom)) < 1e-12:
        return None
    return hom


@dataclass
class PairMatches:
    """One model on one image pair (image 1, image ``target``) of a sequence."""

    sequence: str
    target: int
    matches: np.ndarray  # int64 (M, 2): keypoint of image 1, keypoint of image k
    errors: np.ndarray  # float64 (M,): reprojection error of each match, px
    corner_error: float  # px; inf when RANSAC found no homography

    def accuracy(self, thresholds: Sequence[float]) -> np.ndarray:
        """Fraction of the matches within each threshold; 0 without matches (D2-Net)."""
        if len(self.errors) == 0:
            return np.zeros(len(thresholds))
        return (self.errors[None, :] <= np.asarray(thresholds, np.float64)[:, None]).mean(1)


@dataclass
class ImageMatchingResult:
    """Every model's matches on every (image 1, image k) pair; summaries averaged over the pairs."""

    sequences: list[str]
    keypoints: dict[str, dict[int, np.ndarray]]  # sequence -> image index -> (n, 2) x, y px
    thresholds: tuple[float, ...] = MMA_THRESHOLDS
    homography_thresholds: tuple[float, ...] = HOMOGRAPHY_THRESHOLDS
    settings: dict = field(default_factory=dict)
    pairs: dict[str, list[PairMatches]] = field(default_factory=dict)  # model -> pairs
    skipped: dict[str, str] = field(default_factory=dict)

    def _pairs(self, model: str, prefix: str | None) -> list[PairMatches]:
        return [p for p in self.pairs[model] if prefix is None or p.sequence.startswith(prefix)]

    def mma(self, model: str, prefix: str | None = None) -> np.ndarray:
        """Mean matching accuracy at each threshold, mean over image pairs (of sequences whose name
        starts with ``prefix``, e.g. "i_" / "v_" on HPatches)."""
        return np.mean([p.accuracy(self.thresholds) for p in self._pairs(model, prefix)], axis=0)

    def mean_matches(self, model: str, prefix: str | None = None) -> float:
        return float(np.mean([len(p.matches) for p in self._pairs(model, prefix)]))

    def homography_accuracy(self, model: str, prefix: str | None = None) -> dict[float, float]:
        err = np.array([p.corner_error for p in self._pairs(model, prefix)])
        return {eps: float((err <= eps).mean()) for eps in self.homography_thresholds}

    def table(self) -> str:
        show = [t for t in (1, 3, 5, 10) if t in self.thresholds] or list(self.thresholds)
        rows = [["model", *(f"MMA@{t:g}px" for t in show), "matches", *(f"H@{e:g}px" for e in self.homography_thresholds)]]
        for name in self.pairs:
            mma = dict(zip(self.thresholds, self.mma(name)))
            hom = self.homography_accuracy(name)
            rows.append([name, *(f"{mma[t]:.3f}" for t in show), f"{self.mean_matches(name):.0f}",
                         *(f"{hom[e]:.3f}" for e in self.homography_thresholds)])
        n_pairs = len(next(iter(self.pairs.values()))) if self.pairs else 0
        head = (f"Image matching, {len(self.sequences)} sequence(s), {n_pairs} image pairs (1 vs k): mutual-NN matches "
                f"of DoG keypoints (<= {self.settings.get('max_keypoints')} per image); MMA = correct / matches at the "
                f"reprojection threshold, mean over pairs; H@eps = share of pairs whose RANSAC homography moves "
                f"image 1's corners <= eps px from the ground truth's")
        lines = [text_table(rows, head)] + [f"{n}: skipped ({why})" for n, why in self.skipped.items()]
        return "\n".join(lines)

    def metrics(self) -> dict[str, float]:
        """Flat, MLflow-safe: ``<model>/mma/<t>px``, ``<model>/matches``, ``<model>/homography/<eps>px``."""
        out = {}
        for name in self.pairs:
            out |= {metric_key(name, "mma", f"{t:g}px"): float(v) for t, v in zip(self.thresholds, self.mma(name))}
            out[metric_key(name, "matches")] = self.mean_matches(name)
            out |= {metric_key(name, "homography", f"{e:g}px"): v for e, v in self.homography_accuracy(name).items()}
        return out

    def to_dict(self) -> dict:
        return {"protocol": "image-matching", "sequences": self.sequences, "settings": self.settings,
                "thresholds": list(self.thresholds), "homography_thresholds": list(self.homography_thresholds),
                "keypoints": {s: {str(k): len(v) for k, v in per.items()} for s, per in self.keypoints.items()},
                "skipped": self.skipped,
                "models": {n: {"mma": self.mma(n).tolist(), "matches": self.mean_matches(n),
                               "homography_accuracy": {str(e): v for e, v in self.homography_accuracy(n).items()},
                               "pairs": [{"sequence": p.sequence, "target": p.target, "matches": int(len(p.matches)),
                                          "mma": p.accuracy(self.thresholds).tolist(),
                                          "corner_error": p.corner_error} for p in ps]}
                           for n, ps in self.pairs.items()}}


def _sequence_dirs(sequences: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """A sequence folder, a folder of sequence folders, or a list of sequence folders."""
    if isinstance(sequences, (str, os.PathLike)):
        root = Path(sequences)
        try:
            open_sequence(root)
            return [root]
        except SourceError as e:
            subs = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
            found = []
            for p in subs:
                try:
                    open_sequence(p)
                    found.append(p)
                except SourceError:
                    pass
            if not found:
                raise SourceError(f"{e} (and none of its {len(subs)} sub-folders is a sequence)") from None
            return found
    return [Path(p) for p in sequences]


def evaluate_image_matching(sequences: str | os.PathLike | Sequence[str | os.PathLike],
                            models: Mapping[str, nn.Module] | None, *, sift: bool = True,
                            max_keypoints: int = MAX_KEYPOINTS, patch_size: int = 32,
                            thresholds: Sequence[float] = MMA_THRESHOLDS,
                            homography_thresholds: Sequence[float] = HOMOGRAPHY_THRESHOLDS,
                            ransac_threshold: float = RANSAC_THRESHOLD, seed: int = 0, plan: DevicePlan | None = None,
                            progress: bool = False) -> ImageMatchingResult:
    """Mutual-NN image matching of image 1 against every image k of each sequence, for every
    model (kornia's SIFT first). ``sequences``: a sequence folder (``img1..6`` + ``H1toKp`` or
    ``1..6.ppm`` + ``H_1_k``), a folder of them, or a list. Pair classifiers are skipped (all-pairs
    matching needs an embedding)."""
    dirs = _sequence_dirs(sequences)
    rows = with_sift(models, patch_size, sift)
    names = [d.name for d in dirs]
    if len(set(names)) < len(names):
        raise ValueError(f"sequence folders must have distinct names (results are keyed by name): {names}")
    result = ImageMatchingResult(names, {}, tuple(thresholds), tuple(homography_thresholds),
                                 {"max_keypoints": max_keypoints, "patch_size": patch_size,
                                  "ransac_threshold": ransac_threshold, "seed": seed,
                                  "paths": [str(d.resolve()) for d in dirs]})
    for name, model in rows.items():
        if is_pair_classifier(model):
            result.skipped[name] = "pair classifier: mutual nearest neighbours need an embedding"
        else:
            result.pairs[name] = []
    for d in tqdm(dirs, desc="image matching", unit="seq", disable=not progress):
        seq = open_sequence(d)
        targets = sorted(k for k in seq.images if k != 1)
        if not targets:
            raise SourceError(f"{d}: only image 1 found; matching needs images 2.. and their homographies")
        homs = {k: read_homography(seq.homography_path(k)) for k in targets}
        images, patches, kps = {}, {}, {}
        for k in [1, *targets]:
            img = read_image(seq.images[k])
            lafs = detect_frames(img, max_keypoints)
            images[k] = img.shape
            patches[k] = extract(torch.from_numpy(np.ascontiguousarray(img))[None, None], lafs, patch_size)
            kps[k] = lafs[:, :, 2].copy()
        result.keypoints[d.name] = kps
        for name in result.pairs:
            model = on_device(rows[name], plan)
            desc = {k: describe(model, p, plan) if len(p) else np.zeros((0, 1), np.float32) for k, p in patches.items()}
            for k in targets:
                m = mutual_nearest_neighbours(desc[1], desc[k])
                err = reprojection_errors(kps[1], kps[k], m, homs[k])
                est = estimate_homography(kps[1][m[:, 0]], kps[k][m[:, 1]], ransac_threshold, seed)
                result.pairs[name].append(PairMatches(d.name, k, m, err, corner_error(est, homs[k], images[1])))
    return result


__all__ = ["HOMOGRAPHY_THRESHOLDS", "ImageMatchingResult", "MMA_THRESHOLDS", "PairMatches", "corner_error",
           "estimate_homography", "evaluate_image_matching", "mutual_nearest_neighbours", "project",
           "reprojection_errors"]
