"""The Siamese digits example: pairs of scikit-learn's bundled handwritten digits -> patch-pair shards.

    patchflow shards digits --out shards-digits [--train-pairs 20000 --eval-pairs 2000]

``sklearn.datasets.load_digits`` ships 1797 8x8 images of the digits 0-9 (grey levels 0..16,
~180 per digit) inside the wheel, so nothing is downloaded. Each image is scaled to [0, 1] and
resized to ``patch_size`` x ``patch_size`` by bilinear interpolation with pixel centres at
half-integers and edges clamped (``torch.nn.functional.interpolate(mode="bilinear",
align_corners=False)``, the same as ``skimage.transform.resize(order=1, mode="edge")``), then
rounded to uint8. A pair is positive when both images show the same digit, negative otherwise;
the two images of a pair are always different images.

The images are split BY IMAGE, per digit (stratified): a fraction ``eval_fraction`` of each
digit's images is held out for eval, and no image appears in both splits. The image indices of
each split are recorded in the manifest's generator section.

Train pairs are laid out as every other training split of the pipeline: all positive, because
training builds its negatives inside each batch (``pipeline.losses.batch_loss``: the contrastive
and softmax losses pair anchor i with the positive of another pair, a random derangement).
With ten digits about one in ten of those in-batch "negatives" shows the same digit; the
contrastive loss learns through that label noise. Anchors come in rounds: a round visits every
training image once, in random order, each paired with a random other training image of its
digit. Eval pairs are exactly half positive (``eval_pairs // 2``), anchors in rounds as well.

Shard ids are the digit (0-9) on both sides: ids must be equal iff the pair is positive
(``PairBlock.validate``), and a positive pair joins two different images, so the digit plays the
part the 3D point id plays in PhotoTour.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.data.shards import ShardError, finish_conversion, iter_blocks, write_split

MAX_LEVEL = 16.0  # load_digits' grey levels are 0..16
INTERPOLATION = "bilinear, half-pixel centres, edges clamped (F.interpolate align_corners=False), round to uint8"
MIN_IMAGES_PER_DIGIT = 2  # a positive pair needs two different images of its digit in its split


def digit_patches(patch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits as uint8 patches (N, patch_size, patch_size) and their digits int64 (N,)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.from_numpy(data.images.astype(np.float32) / MAX_LEVEL)[:, None]
    big = F.interpolate(images, size=(patch_size, patch_size), mode="bilinear", align_corners=False)
    patches = np.rint(big[:, 0].clamp(0, 1).numpy() * 255).astype(np.uint8)
    return patches, data.target.astype(np.int64)


def split_by_image(targets: np.ndarray, eval_fraction: float, rng: np.random.Generator
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Sorted image indices (train, eval): of each digit's images ``round(eval_fraction * n)`` go to
    eval, the rest to train; raises ShardError when a split would get fewer than 2 of a digit."""
    train, evals = [], []
    for digit in np.unique(targets):
        own = rng.permutation(np.flatnonzero(targets == digit))
        n_eval = int(round(eval_fraction * len(own)))
        if min(n_eval, len(own) - n_eval) < MIN_IMAGES_PER_DIGIT:
            raise ShardError(f"digits: eval_fraction={eval_fraction} leaves {n_eval} eval and {len(own) - n_eval} "
                             f"train images of digit {digit} (of {len(own)}); each split needs at least "
                             f"{MIN_IMAGES_PER_DIGIT} per digit")
        evals.append(own[:n_eval])
        train.append(own[n_eval:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(evals))


def _anchors(images: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n anchor images in rounds: each round is every image of the split once, in random order."""
    rounds = -(-n // len(images))
    return np.concatenate([rng.permutation(images) for _ in range(rounds)])[:n]


def _partners(anchors: np.ndarray, images: np.ndarray, targets: np.ndarray, same: bool,
              rng: np.random.Generator) -> np.ndarray:
    """For each anchor, a uniformly random other image of the split: of its digit (``same``, never
    the anchor itself) or of any other digit."""
    out = np.empty_like(anchors)
    for digit in np.unique(targets[anchors]):
        rows = np.flatnonzero(targets[anchors] == digit)
        pool = images[(targets[images] == digit) == same]
        if same:  # draw among the digit's images but the anchor: skip the anchor's slot
            slot = np.searchsorted(pool, anchors[rows])
            pick = rng.integers(0, len(pool) - 1, len(rows))
            out[rows] = pool[pick + (pick >= slot)]
        else:
            out[rows] = pool[rng.integers(0, len(pool), len(rows))]
    return out


def digit_pairs(patches: np.ndarray, targets: np.ndarray, images: np.ndarray, n_pairs: int, n_positive: int,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n_pairs`` pairs of the split's ``images`` (sorted indices), the first ``n_positive`` anchors
    with a same-digit partner, the rest with an other-digit one, then shuffled: pairs uint8
    (n, 2, P, P), labels uint8 (n,), ids int64 (n, 2) = the two images' digits."""
    first = _anchors(images, n_pairs, rng)
    second = np.concatenate([_partners(first[:n_positive], images, targets, True, rng),
                             _partners(first[n_positive:], images, targets, False, rng)])
    order = rng.permutation(n_pairs) if n_positive < n_pairs else np.arange(n_pairs)  # mix labels across blocks
    first, second = first[order], second[order]
    pairs = np.stack([patches[first], patches[second]], 1)
    ids = np.stack([targets[first], targets[second]], 1)
    return pairs, (ids[:, 0] == ids[:, 1]).astype(np.uint8), ids


def digits_to_shards(out_dir: str | os.PathLike, *, eval_fraction: float = 0.25, train_pairs: int = 20000,
                     eval_pairs: int = 2000, seed: int = 0, patch_size: int = 32, pairs_per_block: int = 256,
                     blocks_per_shard: int = 8, progress: bool = True) -> dict:
    """Write train/eval shards of digit pairs plus manifest.json to ``out_dir``; return the manifest.

    Deterministic given the arguments: the same call twice writes byte-identical shards; the
    image split depends on ``seed`` and ``eval_fraction`` only, each split's pairs on its own
    random stream (changing ``train_pairs`` leaves the eval pairs unchanged). A bad argument raises
    ShardError (a ValueError the CLI reports in one line) before anything is written.
    """
    if not 0.0 < eval_fraction < 1.0:
        raise ShardError(f"digits: eval_fraction must be in (0, 1), got {eval_fraction}")
    if train_pairs < 1 or eval_pairs < 2:
        raise ShardError(f"digits: need train_pairs >= 1 and eval_pairs >= 2, got {train_pairs}, {eval_pairs}")
    if not 8 <= patch_size <= 256 or pairs_per_block < 1 or blocks_per_shard < 1:
        raise ShardError(f"digits: bad patch_size/pairs_per_block/blocks_per_shard: {patch_size}, {pairs_per_block}, "
                         f"{blocks_per_shard} (expected 8 <= patch_size <= 256, the others >= 1)")
    patches, targets = digit_patches(patch_size)
    images = dict(zip(("train", "eval"), split_by_image(targets, eval_fraction, np.random.default_rng([seed, 2]))))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)  # a crash leaves no manifest describing other shards
    common = {"name": "pipeline.data.digits", "dataset": "sklearn.datasets.load_digits", "seed": seed,
              "eval_fraction": eval_fraction, "patch_size": patch_size, "pairs_per_block": pairs_per_block,
              "blocks_per_shard": blocks_per_shard, "interpolation": INTERPOLATION, "ids": "digit (0-9) of each image"}
    per_split = {
        "train": {"pairs": train_pairs, "positives": train_pairs, "images": images["train"].tolist(),
                  "rule": "all positive (negatives are made in-batch); anchors in rounds over the images"},
        "eval": {"pairs": eval_pairs, "positives": eval_pairs // 2, "images": images["eval"].tolist(),
                 "rule": "half positive, half different digits; anchors in rounds over the images"},
    }
    splits = {}
    for s, stream in (("train", 0), ("eval", 1)):
        rng = np.random.default_rng([seed, stream])
        n, n_pos = per_split[s]["pairs"], per_split[s]["positives"]
        pairs, labels, ids = digit_pairs(patches, targets, images[s], n, n_pos, rng)
        splits[s] = write_split(out, s, iter_blocks(pairs, labels, ids, pairs_per_block), blocks_per_shard,
                                progress=progress, params={**common, s: per_split[s]})
    return finish_conversion(out, source="digits", patch_size=patch_size, pairs_per_block=pairs_per_block,
                             generator={**common, **per_split}, splits=splits)


__all__ = ["INTERPOLATION", "digit_pairs", "digit_patches", "digits_to_shards", "split_by_image"]
