"""Synthetic image sequences from photographs bundled in PyPI wheels -> patch pairs.

    patchflow shards synthetic --out shards [--train-pairs 20000 --eval-pairs 4000]

Every source photograph becomes an image sequence like the real ones ``pipeline.data.sequences``
reads (Oxford graf, HPatches): image 1 is the photograph; images 2..K+1 show the same surface from
other viewpoints, under other light, through another camera. A view is a random homography
(out-of-plane tilt and its foreshortening, in-plane rotation, zoom, perspective), rendered with the
anisotropic anti-aliasing a camera's pixels give (a foreshortened surface is seen at lower
resolution across the tilt), then photometry (defocus blur, gamma, contrast, brightness, a
lighting gradient, sensor noise, 8-bit quantisation).

Pairs come from the very code that builds real pairs from such sequences
(``sequences.correspondences``): DoG keypoints detected in image 1 with their LAFOrienter
orientation, each frame carried into image k by the local affine approximation of H, detector-like
jitter, patches from the scale pyramid; keypoints whose image-1 patch is nearly flat (intensity std
below ``min_patch_std``, a contrast threshold as detectors have) are dropped. So the synthetic
patches have the statistics of real detector patches (blob centres, 12-sigma support, detector
noise) and differ from real pairs only in what the homography cannot model. Train and eval use disjoint photographs.

Train pairs are all positive (hardest-in-batch mining takes every other pair of a batch as a
negative) and ordered in rounds: a round visits every usable keypoint of every training
photograph once, in random order, each with a random target image and fresh jitter, so a batch
almost never holds the same point twice while later rounds show the points under other views.
Eval pairs are half positive; a negative joins two points at least a frame radius apart.

Variety (``train_mix`` / ``eval_mix``, {construction: weight}): shares of a split cut with other
constructions of ``pipeline.data.sequences`` from the same rendered views: DoG, Harris or Hessian
frames, upright, dominant or rotated (+-30 degrees) orientation, detector-like or HPatches easy /
hard / tough affine jitter; so training can cover what users' detectors give, and the eval split
can measure it. Default: all "dog-oriented", the data above.
"""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from pipeline.data import sequences
from pipeline.data.sequences.constructions import DEFAULT
from pipeline.data.shards import finish_conversion, PairBlock, write_split

# "package:file", shipped inside the wheels, so nothing is downloaded. Disjoint scenes between the
# splits: motorcycle_right is left out because it is the stereo partner of motorcycle_left.
TRAIN_IMAGES = ("skimage:astronaut.png", "skimage:brick.png", "skimage:camera.png", "skimage:chelsea.png",
                "skimage:coffee.png", "skimage:grass.png", "skimage:gravel.png", "skimage:hubble_deep_field.jpg",
                "skimage:motorcycle_left.png", "skimage:page.png", "skimage:rocket.jpg", "skimage:text.png",
                "matplotlib:grace_hopper.jpg", "sklearn:china.jpg")
EVAL_IMAGES = ("skimage:clock_motion.png", "skimage:coins.png", "skimage:ihc.png", "skimage:moon.png",
               "skimage:retina.jpg", "sklearn:flower.jpg")

EVAL_ID_OFFSET = 1 << 32  # train ids number the train pairs; eval ids are (sequence + 1) << 32 | keypoint

# Everything that shapes the data; recorded in the manifest's generator section (with the
# detector and jitter parameters of pipeline.data.sequences.PARAMS).
PARAMS: dict = {
    "min_image_side": 256,  # smaller photographs are upscaled 2x (page, text)
    "views_per_image": 8,  # target images 2..9 of each synthetic sequence
    "max_keypoints": 3000,  # DoG keypoints kept per photograph (strongest first)
    "max_tilt_deg": 65.0,  # out-of-plane tilt, uniform: foreshortening 1 .. 1/cos(65) = 2.4
    "rotation_deg": 30.0,  # in-plane, uniform +-
    "scale_range": [0.6, 1.6],  # zoom, log-uniform
    "perspective": 0.25,  # projective terms, in coordinates normalised by half the longer side
    "defocus_sigma_range": [0.0, 1.2],  # px of image k, uniform
    "gamma_range": [0.6, 1.6],  # log-uniform
    "gain_range": [0.6, 1.5],  # log-uniform contrast about the image mean
    "bias": 0.1,
    "lighting_gradient": 0.3,  # max relative brightness change across half the image
    "noise_sigma_range": [0.0, 0.02],  # fraction of full scale
    # Contrast threshold on image 1's keypoints (sequences.correspondences): a patch whose intensity
    # std is below the views' mean sensor noise (0.01 of full scale, 2.6 grey levels) is dropped.
    # kornia's DoG keeps extrema in blurred and flat regions (clock_motion, moon); a quarter of the
    # eval positives were such patches, on which per-patch standardisation (HardNet, L2-Net, SOSNet,
    # HardNet8) magnifies noise, so they ranked models by flatness, not by matching
    # (benchmarks/README, "Why the pair models lead on the synthetic split").
    "min_patch_std": 0.01,
}


def source_images() -> dict[str, list[str]]:
    """Photographs ("package:file") used for each split; train and eval are disjoint."""
    return {"train": list(TRAIN_IMAGES), "eval": list(EVAL_IMAGES)}


def source_path(ref: str) -> Path:
    """The file behind "package:file" inside the installed wheel."""
    package, name = ref.split(":", 1)
    if package == "skimage":
        import skimage.data

        return Path(skimage.data.data_dir) / name
    if package == "matplotlib":
        import matplotlib

        return Path(matplotlib.get_data_path()) / "sample_data" / name
    if package == "sklearn":
        return Path(str(importlib.resources.files("sklearn.datasets") / "images" / name))
    raise ValueError(f"{ref}: unknown source package {package!r} (expected skimage, matplotlib or sklearn)")


def load_image(ref: str) -> np.ndarray:
    """Grayscale float32 (H, W) in [0, 1] of a bundled photograph, small ones upscaled 2x."""
    from skimage import color, io

    path = source_path(ref)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: source photograph {ref} missing from its installed package")
    im = io.imread(path)
    if im.ndim == 3:
        im = color.rgb2gray(im[..., :3])
    elif im.dtype == np.uint8:
        im = im / 255.0
    im = im.astype(np.float32)
    if min(im.shape) < PARAMS["min_image_side"]:
        im = np.clip(ndimage.zoom(im, 2.0, order=1), 0, 1)
    return im


def random_homography(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A (3, 3) pixel homography of a viewpoint change, image 1 -> view, about the image centre:
    zoom x rotation x tilt (compression by cos(tilt) along a random direction) plus perspective."""
    p = PARAMS
    tilt = np.deg2rad(rng.uniform(0.0, p["max_tilt_deg"]))
    phi = rng.uniform(0.0, np.pi)
    psi = np.deg2rad(rng.uniform(-p["rotation_deg"], p["rotation_deg"]))
    zoom = np.exp(rng.uniform(*np.log(p["scale_range"])))

    def rot(a: float) -> np.ndarray:
        return np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])

    hn = np.eye(3)
    hn[:2, :2] = zoom * rot(psi) @ rot(phi) @ np.diag([1.0, np.cos(tilt)]) @ rot(-phi)
    hn[2, :2] = rng.uniform(-p["perspective"], p["perspective"], 2)
    h, w = shape
    half = max(h, w) / 2.0
    norm = np.array([[1 / half, 0, -(w - 1) / 2 / half], [0, 1 / half, -(h - 1) / 2 / half], [0, 0, 1]])
    return np.linalg.inv(norm) @ hn @ norm


def _gaussian_kernel(cov: np.ndarray) -> torch.Tensor | None:
    """Normalised 2-D Gaussian kernel (1, 1, k, k) of covariance ``cov`` (x, y order), None if ~delta."""
    evals, evecs = np.linalg.eigh(cov)
    evals = np.maximum(evals, 0.0)
    if evals.max() < 0.05:
        return None
    cov = evecs @ np.diag(np.maximum(evals, 1e-2)) @ evecs.T
    r = int(np.ceil(3 * np.sqrt(evals.max())))
    t = np.arange(-r, r + 1, dtype=np.float64)
    x, y = np.meshgrid(t, t)  # x along columns
    d = np.stack([x, y], -1)
    k = np.exp(-0.5 * np.einsum("...i,ij,...j->...", d, np.linalg.inv(cov), d))
    return torch.from_numpy((k / k.sum()).astype(np.float32))[None, None]


def _blur(img: torch.Tensor, cov: np.ndarray) -> torch.Tensor:
    kernel = _gaussian_kernel(cov)
    if kernel is None:
        return img
    r = kernel.shape[-1] // 2
    return F.conv2d(F.pad(img, (r, r, r, r), mode="reflect"), kernel)


def render_view(img1: np.ndarray, hom: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Image 1 (H, W) seen through ``hom`` by another camera: float32 (H, W) in [0, 1], 8-bit levels.

    Anti-aliasing: a view pixel (footprint ~ a Gaussian of 0.5 px) covers A^-1 of it in image 1,
    A the homography's Jacobian at the centre; image 1 is blurred by the covariance that is missing
    (anisotropic: only across the foreshortening), then resampled bilinearly.
    """
    from kornia.geometry.transform import warp_perspective

    p = PARAMS
    h, w = img1.shape
    centre_frame = np.array([[[1.0, 0.0, (w - 1) / 2], [0.0, 1.0, (h - 1) / 2]]])
    jac = sequences.map_frames(centre_frame, hom)[0][0, :, :2]  # H's Jacobian at the image centre
    a_inv = np.linalg.inv(jac)
    src = torch.from_numpy(np.ascontiguousarray(img1))[None, None]
    src = _blur(src, 0.25 * (a_inv @ a_inv.T - np.eye(2)))
    view = warp_perspective(src, torch.from_numpy(hom).float()[None], (h, w), mode="bilinear",
                            padding_mode="reflection", align_corners=True)
    defocus = rng.uniform(*p["defocus_sigma_range"])
    view = _blur(view, defocus**2 * np.eye(2))[0, 0].numpy()

    gamma = np.exp(rng.uniform(*np.log(p["gamma_range"])))
    gain = np.exp(rng.uniform(*np.log(p["gain_range"])))
    bias = rng.uniform(-p["bias"], p["bias"])
    yy, xx = np.mgrid[:h, :w]
    slope = rng.uniform(-p["lighting_gradient"], p["lighting_gradient"], 2) / (max(h, w) / 2)
    lighting = 1.0 + slope[0] * (xx - (w - 1) / 2) + slope[1] * (yy - (h - 1) / 2)
    view = np.clip(view, 0, 1) ** gamma * lighting
    view = (view - view.mean()) * gain + view.mean() + bias
    view = view + rng.uniform(*p["noise_sigma_range"]) * rng.standard_normal(view.shape)
    return (np.rint(np.clip(view, 0, 1) * 255) / 255).astype(np.float32)


def render_sequence(ref: str, rng: np.random.Generator
                    ) -> tuple[np.ndarray, dict[int, np.ndarray], dict[int, np.ndarray]]:
    """One photograph as a sequence: (image 1, views {k: image}, homographies {k: H 1 -> k})."""
    img1 = load_image(ref)
    homs = {k: random_homography(img1.shape, rng) for k in range(2, 2 + PARAMS["views_per_image"])}
    views = {k: render_view(img1, hom, rng) for k, hom in homs.items()}
    return img1, views, homs


def synthetic_sequence(ref: str, rng: np.random.Generator, patch_size: int,
                       construction: str = DEFAULT) -> sequences.Correspondences:
    """Keypoints of one photograph and their frames in ``views_per_image`` rendered views."""
    return _correspondences(ref, render_sequence(ref, rng), patch_size, construction)


def _correspondences(ref: str, rendered: tuple, patch_size: int, construction: str) -> sequences.Correspondences:
    img1, views, homs = rendered
    return sequences.correspondences(ref, img1, views, homs, patch_size, PARAMS["max_keypoints"],
                                     source=source_path(ref), construction=construction,
                                     plane_check=False,  # views are exact everywhere: no occluders to drop
                                     min_patch_std=PARAMS["min_patch_std"])


def _train_split(cors: list[sequences.Correspondences], n: int, patch: int, rng: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n positive pairs in rounds (see the module docstring)."""
    usable = [np.flatnonzero(np.any([c.valid[k] for k in c.targets], 0)) for c in cors]
    per_round = sum(u.size for u in usable)
    if per_round == 0:
        raise RuntimeError("synthetic: no keypoint stays inside any rendered view")
    rounds = -(-n // per_round)
    seq_of = np.concatenate([np.full(u.size, i) for i, u in enumerate(usable)])
    point_of = np.concatenate(usable)
    order = np.concatenate([rng.permutation(per_round) for _ in range(rounds)])[:n]
    seq, point = seq_of[order], point_of[order]
    pairs = np.empty((n, 2, patch, patch), np.uint8)
    for i, cor in enumerate(cors):
        rows = np.flatnonzero(seq == i)
        if rows.size == 0:
            continue
        pts = point[rows]
        valid = np.stack([cor.valid[k][pts] for k in cor.targets], 1)
        target = np.asarray(cor.targets)[(rng.random(valid.shape) * valid).argmax(1)]  # random valid view
        pairs[rows, 0] = cor.patches1[pts]
        pairs[rows, 1] = cor.patches_k(pts, target, rng, patch)
    return pairs, np.ones(n, np.uint8), np.repeat(np.arange(n, dtype=np.int64)[:, None], 2, 1)


def _eval_split(cors: list[sequences.Correspondences], n: int, patch: int, rng: np.random.Generator,
                first_sequence: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n pairs, exactly n // 2 positive, spread over the eval photographs as evenly as their
    correspondences allow. Ids: (first_sequence + photograph + 1) << 32 | keypoint."""
    caps = [int(cor.candidates()[0].size) for cor in cors]
    if sum(caps) < n // 2:
        raise RuntimeError(f"synthetic: {n} eval pairs need {n // 2} positive correspondences, the eval "
                           f"photographs have {sum(caps)}")
    positives = [0] * len(cors)
    left = n // 2
    while left:  # water filling: an even share for every photograph that still has room
        open_ = [i for i, c in enumerate(caps) if positives[i] < c]
        share = max(1, left // len(open_))
        for i in open_:
            add = min(share, caps[i] - positives[i], left)
            positives[i] += add
            left -= add
    counts = [2 * k for k in positives]
    counts[int(np.argmax(counts))] += n % 2  # an odd n: one more negative
    parts = [sequences.eval_pairs(cor, c, rng, patch, (first_sequence + i + 1) * EVAL_ID_OFFSET)
             for i, (cor, c) in enumerate(zip(cors, counts)) if c]
    pairs, labels, ids = (np.concatenate([p[j] for p in parts]) for j in range(3))
    order = rng.permutation(n)  # mix photographs (and labels) across blocks
    return pairs[order], labels[order], ids[order]


def _make_split(split: str, refs: list[str], n_pairs: int, patch: int, seed: int, progress: bool = False,
                mix: dict[str, float] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A split's arrays; ``mix`` ({construction: weight}, see ``generate_synthetic``) cuts each share
    of the pairs with its construction from the same rendered views."""
    from tqdm import tqdm

    # Independent stream per split: changing train_pairs leaves the eval data unchanged.
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0 if split == "train" else 1]))
    rendered = [render_sequence(ref, rng)
                for ref in tqdm(refs, desc=f"synthetic {split} sequences", unit="image", disable=not progress)]
    counts = mix_counts(mix, n_pairs, split)
    parts = []
    for slot, (name, n) in enumerate(counts.items()):
        if n:
            cors = [_correspondences(ref, r, patch, name) for ref, r in zip(refs, rendered)]
            parts.append(_train_split(cors, n, patch, rng) if split == "train"
                         else _eval_split(cors, n, patch, rng, first_sequence=slot * len(refs)))
    if len(parts) == 1:  # one construction (today's default): no re-ordering
        return parts[0]
    pairs, labels, ids = (np.concatenate([part[j] for part in parts]) for j in range(3))
    if split == "eval":
        order = rng.permutation(n_pairs)  # mix constructions (and labels) across blocks
        return pairs[order], labels[order], ids[order]
    # train: interleave the constructions at random, each keeping its order (rounds over its points)
    source = rng.permutation(np.repeat(np.arange(len(parts)), [len(part[1]) for part in parts]))
    order = np.empty(n_pairs, np.int64)
    start = 0
    for j, part in enumerate(parts):
        order[source == j] = start + np.arange(len(part[1]))
        start += len(part[1])
    return pairs[order], labels, np.repeat(np.arange(n_pairs, dtype=np.int64)[:, None], 2, 1)


# Named mixes (``--train-mix varied --eval-mix varied``, what ``make reference`` cuts; issue 13). Train:
# three detectors, upright / dominant / rotated frames, detector-like and HPatches-hard jitter, so a
# descriptor learns what users' detectors give, not one construction. Eval: the same variety plus
# combinations the train mix never cuts (DoG easy, Harris tough), where settings are chosen; the
# choice (HardNet, 61k pairs, against the default all-"dog-oriented" train data on this eval split)
# is in benchmarks/README.md. Graf (real pairs) is the test, never used to choose these. Cost: every
# construction detects anew, so "varied" takes ~7x the default's generation time (measured 490 vs
# 72 CPU-s for 20k + 2k pairs; 154 vs 32 s wall for 120k + 4k on a 2-vCPU EPYC, 2026-12-06), too much for the
# demo's 10 minutes on slower CPUs. "dog" (what ``make demo`` cuts) keeps most of the variety's gain at
# almost the default's cost: one detector at one radius, so every construction of a photograph shares
# its one scale-space search (``sequences.detection._scale_space``); upright, dominant and rotated
# frames, detector-like and HPatches-hard jitter. Its eval split adds DoG combinations the train mix
# never cuts (easy jitter, upright tough). Measured on a 2-vCPU EPYC (AVX2 only), 120k + 4k pairs with
# the varied eval split: 74 s against the default's 64 s; the demo's HardNet trained on it, chosen on the
# varied eval split (0.345 vs 0.408), then graf: benchmarks/README.md, "A DoG-only mix for the demo".
NAMED_MIXES: dict[str, dict[str, dict[str, float]]] = {
    "varied": {
        "train": {"dog-oriented": 1, "dog-upright": 1, "harris-upright": 1, "hessian-upright": 1, "dog-rotated": 1,
                  "harris-oriented-hard": 1, "hessian-oriented-hard": 1, "hpatches-hard": 1},
        "eval": {"dog-oriented": 1, "dog-upright": 1, "harris-upright": 1, "hessian-upright": 1,
                 "dog-oriented-easy": 1, "hessian-oriented-hard": 1, "harris-oriented-tough": 1},
    },
    "dog": {
        "train": {"dog-oriented": 1, "dog-upright": 1, "dog-rotated": 1, "dog-oriented-hard": 1},
        "eval": {"dog-oriented": 1, "dog-upright": 1, "dog-oriented-easy": 1, "dog-upright-tough": 1},
    },
}


def parse_mix(text: str, split: str = "train") -> dict[str, float]:
    """``"dog-oriented=2,harris-upright=1,hessian-rotated-hard"`` -> {construction: weight} (weight
    1 where omitted), checked: what a ``--train-mix`` / ``--eval-mix`` flag passes to ``generate_synthetic``.
    A name of ``NAMED_MIXES`` (``"varied"``, ``"dog"``) gives that preset's mix for ``split``."""
    if text.strip() in NAMED_MIXES:
        return dict(NAMED_MIXES[text.strip()][split])
    mix: dict[str, float] = {}
    for item in (s.strip() for s in text.split(",")):
        name, _, weight = item.partition("=")
        try:
            mix[name.strip()] = float(weight) if weight.strip() else 1.0
        except ValueError:
            raise ValueError(f"mix {text!r}: weight of {name.strip()!r} must be a number, got {weight!r}") from None
    _check_mix(mix, "mix")
    return mix


def _check_mix(mix: dict[str, float], what: str) -> None:
    if not mix:
        raise ValueError(f"{what}: empty; give construction=weight pairs")
    for name, weight in mix.items():
        sequences.get_construction(name)  # an unknown name: one error listing the valid ones
        if not (np.isfinite(weight) and weight > 0):
            raise ValueError(f"{what}: weight of {name!r} must be a positive number, got {weight}")


def mix_counts(mix: dict[str, float] | None, n: int, split: str) -> dict[str, int]:
    """Pairs per construction: ``n`` shared in proportion to the weights (largest remainder, ties to
    the first), in whole positive+negative couples for eval (exactly n // 2 positives in all)."""
    if not mix:
        return {DEFAULT: n}
    unit = 2 if split == "eval" else 1
    units = n // unit
    w = np.asarray(list(mix.values()), np.float64)
    exact = units * w / w.sum()
    counts = np.floor(exact).astype(np.int64)
    counts[np.argsort(-(exact - counts), kind="stable")[: units - counts.sum()]] += 1
    counts *= unit
    counts[int(np.argmax(counts))] += n - counts.sum()  # an odd eval n: one more negative
    return dict(zip(mix, counts.tolist()))


def generate_synthetic(out_dir: str | os.PathLike, *, train_pairs: int = 20000, eval_pairs: int = 4000,
                       patch_size: int = 32, pairs_per_block: int = 256, blocks_per_shard: int = 8, seed: int = 0,
                       images: dict[str, list[str]] | None = None, progress: bool = True,
                       train_mix: dict[str, float] | None = None, eval_mix: dict[str, float] | None = None) -> dict:
    """Write train/eval shards of synthetic pairs plus manifest.json to ``out_dir``; return the manifest.

    ``images`` ({"train": [...], "eval": [...]}, "package:file" refs) replaces the default
    photographs, e.g. a few small ones where generation time matters more than variety (tests).
    ``train_mix`` / ``eval_mix``: {construction: weight} (``sequences.get_construction`` names, e.g.
    {"dog-oriented": 2, "harris-upright": 1, "hessian-rotated-hard": 1}; ``parse_mix`` reads
    "name=weight,..."): the split's pairs are shared in proportion to the weights, each share cut by
    its construction (detector, upright / dominant / rotated orientation, detector-like or HPatches
    jitter) from the same rendered views; train shares are interleaved at random, eval shares
    shuffled together. Default (None): every pair "dog-oriented", today's data byte for byte.
    Deterministic given the arguments: the same call twice writes byte-identical shards.
    """
    for what, mix in (("train_mix", train_mix), ("eval_mix", eval_mix)):
        if mix is not None:
            _check_mix(mix, what)
    images = source_images() if images is None else {split: list(images.get(split, [])) for split in ("train", "eval")}
    if not images["train"] or not images["eval"]:
        raise ValueError(f"synthetic images: need at least one photograph per split, got {images}")
    if set(images["train"]) & set(images["eval"]):
        raise ValueError(f"synthetic images: train and eval share {sorted(set(images['train']) & set(images['eval']))}")
    for ref in images["train"] + images["eval"]:
        source_path(ref)  # an unknown package fails here, before any work
    if train_pairs < 1 or eval_pairs < 2:
        raise ValueError(f"need train_pairs >= 1 and eval_pairs >= 2, got {train_pairs}, {eval_pairs}")
    if patch_size < 8 or pairs_per_block < 1 or blocks_per_shard < 1:
        raise ValueError(f"bad patch_size/pairs_per_block/blocks_per_shard: {patch_size}, {pairs_per_block}, "
                         f"{blocks_per_shard}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # A crash from here on leaves no manifest rather than an old one describing new shards.
    (out / "manifest.json").unlink(missing_ok=True)
    splits = {}
    mixes = {"train": train_mix, "eval": eval_mix}
    for split, n in (("train", train_pairs), ("eval", eval_pairs)):
        pairs, labels, ids = _make_split(split, images[split], n, patch_size, seed, progress, mixes[split])
        blocks = (PairBlock(pairs[i : i + pairs_per_block], labels[i : i + pairs_per_block],
                            ids[i : i + pairs_per_block]) for i in range(0, n, pairs_per_block))
        splits[split] = write_split(out, split, blocks, blocks_per_shard, progress=progress)
    return finish_conversion(out, source="synthetic", patch_size=patch_size, pairs_per_block=pairs_per_block,
                             generator={
            "name": "pipeline.data.synthetic", "seed": seed, "train_pairs": train_pairs, "eval_pairs": eval_pairs,
            "patch_size": patch_size, "pairs_per_block": pairs_per_block, "blocks_per_shard": blocks_per_shard,
            "images": images, "eval_id_offset": EVAL_ID_OFFSET, **PARAMS,
            "pairs": dict(sequences.PARAMS),
            **{f"{split}_mix": {name: {"weight": (mix or {name: 1.0})[name], "pairs": count,
                                       **sequences.get_construction(name).params()}
                                for name, count in mix_counts(mix, n, split).items()}
               for split, mix, n in (("train", train_mix, train_pairs), ("eval", eval_mix, eval_pairs))},
        }, splits=splits)
