"""Pair sampling from correspondences: eval pairs (half positive, negatives a frame radius apart) and
training pairs (all positive, a point at most once per block), seeded per (split, sequence)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from pipeline.data.sequences.constructions import DEFAULT, Construction, get_construction
from pipeline.data.sequences.correspondence import Correspondences, _correspondences
from pipeline.data.sequences.frames import laf_scale
from pipeline.data.sequences.layout import _scan, find_sequences, open_sequence
from pipeline.data.sequences.params import PARAMS
from pipeline.data.shards import SourceError, block_sizes

ID_SHIFT = 32


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
                   progress: bool = False, construction: str | Construction = DEFAULT
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labelled eval pairs: (pairs uint8 (N, 2, P, P), labels uint8 (N,), ids int64 (N, 2)).

    ``seq_dir``: one sequence folder, or a folder of sequences (all of them, in name order, ids
    ``sequence_index << 32 | keypoint``). ``n_pairs``: pairs per sequence, half positive (default:
    every correspondence once as a positive plus as many negatives). ``targets``: image indices
    paired with image 1 (default all, e.g. 2..6). ``redetect``: positives only where the detector
    finds the point again in image k (PhotoTour's criterion; easier pairs). Identical output for
    identical arguments: the same pairs ``sequence_to_shards(seq_dir, ..., split="eval")`` writes.
    ``construction``: how pairs are cut, a name of ``CONSTRUCTIONS`` (default today's, "dog-oriented").
    """
    _check(patch_size, max_keypoints, n_pairs, 2)
    how = get_construction(construction)
    dirs = find_sequences(seq_dir) if _scan(Path(seq_dir)) is None else [Path(seq_dir)]
    seqs = [open_sequence(d) for d in dirs]
    out = []
    for i, seq in enumerate(tqdm(seqs, desc="sequences eval", unit="seq", disable=not progress, file=sys.stderr)):
        cor = _correspondences(seq, targets, patch_size, max_keypoints, redetect, how)
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
