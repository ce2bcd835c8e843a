"""Synthetic patch pairs from the photographs bundled in the scikit-image wheel.

A pair is one scene point seen under two independent random views. A view is a random homography
near identity (rotation, log-uniform scale, anisotropy, shear, perspective) plus a detector-like
frame: the patch is centred on the warped point, its support follows the point's scale and
orientation through the homography's local Jacobian (as a scale/rotation-covariant detector
would), with small detector noise (position, scale, orientation). What differs between the two
patches of a positive pair is therefore what differs between real detections: residual
anisotropy/shear/perspective, detector jitter, and photometry (blur, gain, bias, gamma, noise).

Patch pixels are sampled in one vectorised ``grid_sample`` call per image: for patch grid
coordinates q in the warped image, source coordinates are H^-1(q).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from pipeline.data.shards import finish_conversion, PairBlock, write_split

# Only files shipped inside the wheel (skimage/data/*), so nothing is downloaded. Disjoint scenes:
# motorcycle_right is excluded from eval because it is the stereo partner of motorcycle_left.
TRAIN_IMAGES = ("astronaut.png", "brick.png", "camera.png", "chelsea.png", "coffee.png", "grass.png",
                "gravel.png", "hubble_deep_field.jpg", "motorcycle_left.png", "page.png", "rocket.jpg",
                "text.png")
EVAL_IMAGES = ("clock_motion.png", "coins.png", "ihc.png", "moon.png", "retina.jpg")

EVAL_ID_OFFSET = 1 << 32  # eval point ids never collide with train ids

# Everything that shapes the data; recorded in the manifest's generator section.
PARAMS: dict = {
    "min_image_side": 256,  # smaller images are upscaled 2x (page, text)
    "harris_sigmas": [1.6, 2.4, 3.6],  # integration scales; differentiation scale = 0.7x
    "harris_rel_threshold": 0.01,  # x the image's 99.5th percentile response: "has texture"
    "min_point_distance_px": 5,  # greedy separation of points within an image
    "base_scale_per_sigma": 2.0,  # point scale s = 2 sigma_i, log-jittered by +-0.15
    "support": 2.5,  # patch half-width = support * s (patch side = 5 s)
    "rotation_deg": 25.0,
    "scale_range": [0.7, 1.4],  # log-uniform
    "anisotropy_log": 0.25,
    "shear": 0.15,
    "perspective": 0.2,  # in coordinates normalised by half the longer image side
    "position_jitter_px": 1.0,
    "scale_jitter": 0.1,  # +-10 %
    "orientation_jitter_deg": 10.0,
    "gain_range": [0.7, 1.4],  # log-uniform contrast about the patch mean
    "bias": 0.1,
    "gamma_range": [0.7, 1.4],  # log-uniform
    "blur_sigma_range": [0.0, 1.2],  # patch pixels
    "noise_sigma_range": [0.0, 0.02],  # fraction of full scale
    "hard_negative_fraction": 0.5,  # eval negatives from a nearby point of the same image
    "hard_negative_k": 4,
}
_PAD = 3  # extra border sampled for the blur kernel (radius 3), cropped afterwards
_CHUNK = 2048  # points sampled per grid_sample call


def source_images() -> dict[str, list[str]]:
    """File names (in ``skimage/data``) used for each split; train and eval are disjoint."""
    return {"train": list(TRAIN_IMAGES), "eval": list(EVAL_IMAGES)}


def load_image(name: str) -> np.ndarray:
    """Grayscale float32 image in [0, 1] from the scikit-image wheel, small ones upscaled 2x."""
    import skimage.data
    from skimage import color, io

    im = io.imread(os.path.join(skimage.data.data_dir, name))
    if im.ndim == 3:
        im = color.rgb2gray(im[..., :3])
    elif im.dtype == np.uint8:
        im = im / 255.0
    im = im.astype(np.float32)
    if min(im.shape) < PARAMS["min_image_side"]:
        im = ndimage.zoom(im, 2.0, order=1)
    return im


def _keypoints(im: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Textured points in greedy random order: (xy float64 (n, 2) subpixel, scale (n,)).

    Multi-scale, scale-normalised Harris; candidate pixels have a response above a fraction of the
    image's top responses and a border margin that fits the largest possible patch at that scale.
    They are visited in a random order biased to strong corners (log R + Gumbel noise, i.e. a
    weighted random subset) and accepted if no accepted point lies within min_point_distance.
    """
    sig = np.array(PARAMS["harris_sigmas"])
    resp = []
    for si in sig:
        sd = 0.7 * si
        gx = ndimage.gaussian_filter(im, sd, order=(0, 1)) * sd
        gy = ndimage.gaussian_filter(im, sd, order=(1, 0)) * sd
        sxx, syy, sxy = (ndimage.gaussian_filter(g, si) for g in (gx * gx, gy * gy, gx * gy))
        resp.append(sxx * syy - sxy**2 - 0.04 * (sxx + syy) ** 2)
    stack = np.stack(resp)
    r, level = stack.max(0), stack.argmax(0)
    h, w = im.shape
    # half-side of the largest patch (scale and jitter maxima) x sqrt(2) (rotation) x 1.3 (anisotropy)
    margin = sig[level] * PARAMS["base_scale_per_sigma"] * np.exp(0.15) * 1.1 * PARAMS["support"] * 1.42 * 1.3
    yy, xx = np.mgrid[:h, :w]
    ok = (xx >= margin) & (yy >= margin) & (xx <= w - 1 - margin) & (yy <= h - 1 - margin)
    top = np.percentile(r[ok], 99.5) if ok.any() else 0.0
    ys, xs = np.nonzero(ok & (r > PARAMS["harris_rel_threshold"] * top) & (r > 0))
    order = np.argsort(-(np.log(r[ys, xs]) + rng.gumbel(size=ys.size)), kind="stable")
    d = PARAMS["min_point_distance_px"]
    dy, dx = np.mgrid[-d : d + 1, -d : d + 1]
    disk = dy**2 + dx**2 < d * d
    taken = np.zeros((h + 2 * d, w + 2 * d), bool)  # padded so the disk never needs clipping
    keep = []
    for i in order:
        y, x = ys[i], xs[i]
        if not taken[y + d, x + d]:
            keep.append(i)
            taken[y : y + 2 * d + 1, x : x + 2 * d + 1] |= disk
    keep = np.asarray(keep, dtype=np.int64)
    xy = np.stack([xs[keep], ys[keep]], 1) + rng.uniform(-0.5, 0.5, (keep.size, 2))
    s = sig[level[ys[keep], xs[keep]]] * PARAMS["base_scale_per_sigma"] * np.exp(rng.uniform(-0.15, 0.15, keep.size))
    return xy, s


def _allocate(n: int, caps: list[int]) -> list[int]:
    """Split n points over images as evenly as capacity allows (water filling); beyond the total
    capacity the remainder is spread evenly again (those points reuse locations under new ids)."""
    alloc = [0] * len(caps)
    left = n
    while left > 0:
        open_ = [i for i, c in enumerate(caps) if alloc[i] < c] or list(range(len(caps)))
        share, extra = divmod(left, len(open_))
        for j, i in enumerate(open_):
            room = caps[i] - alloc[i] if caps[i] > alloc[i] else left
            add = min(share + (j < extra), room)
            alloc[i] += add
            left -= add
    return alloc


def _random_homographies(n: int, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """(n, 3, 3) pixel-coordinate homographies near identity, built in coordinates centred on the
    image and normalised by half its longer side (so perspective strength is size independent)."""
    p = PARAMS
    th = np.deg2rad(rng.uniform(-p["rotation_deg"], p["rotation_deg"], n))
    sc = np.exp(rng.uniform(*np.log(p["scale_range"]), n))
    an = np.exp(rng.uniform(-p["anisotropy_log"], p["anisotropy_log"], n))
    sh = rng.uniform(-p["shear"], p["shear"], n)
    persp = rng.uniform(-p["perspective"], p["perspective"], (n, 2))
    c, s = np.cos(th), np.sin(th)
    rot = np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)
    upper = np.zeros((n, 2, 2))
    upper[:, 0, 0], upper[:, 0, 1], upper[:, 1, 1] = sc * an, sh, sc / an
    hn = np.zeros((n, 3, 3))
    hn[:, :2, :2] = rot @ upper
    hn[:, 2, :2], hn[:, 2, 2] = persp, 1.0
    h, w = shape
    half = max(h, w) / 2.0
    norm = np.array([[1 / half, 0, -(w - 1) / 2 / half], [0, 1 / half, -(h - 1) / 2 / half], [0, 0, 1]])
    return np.linalg.inv(norm) @ hn @ norm


def _sample_views(im: np.ndarray, xy: np.ndarray, scale: np.ndarray, angle: np.ndarray, patch: int,
                  rng: np.random.Generator) -> np.ndarray:
    """One random view per point: float32 (n, P+2*_PAD, P+2*_PAD) patches sampled from ``im``."""
    p, n = PARAMS, len(xy)
    hom = _random_homographies(n, im.shape, rng)
    xh = np.concatenate([xy, np.ones((n, 1))], 1)
    hx = np.einsum("nij,nj->ni", hom, xh)
    warped = hx[:, :2] / hx[:, 2:]
    # Local Jacobian of the homography at the point: the detector's frame follows it.
    jac = (hom[:, :2, :2] - warped[:, :, None] * hom[:, 2, None, :2]) / hx[:, 2, None, None]
    direction = np.einsum("nij,nj->ni", jac, np.stack([np.cos(angle), np.sin(angle)], 1))
    theta = np.arctan2(direction[:, 1], direction[:, 0]) + np.deg2rad(
        rng.uniform(-p["orientation_jitter_deg"], p["orientation_jitter_deg"], n))
    s_w = scale * np.sqrt(np.abs(np.linalg.det(jac))) * np.exp(
        rng.uniform(np.log(1 - p["scale_jitter"]), np.log(1 + p["scale_jitter"]), n))
    centre = warped + rng.uniform(-p["position_jitter_px"], p["position_jitter_px"], (n, 2))
    g = patch + 2 * _PAD
    k = (np.arange(g) - (g - 1) / 2) * (2 * p["support"] / patch)  # in units of the point scale
    u, v = np.meshgrid(k, k)  # u along x (columns), v along y (rows)
    c, s = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
    sw = s_w[:, None, None]
    qx = centre[:, 0, None, None] + sw * (c * u - s * v)
    qy = centre[:, 1, None, None] + sw * (s * u + c * v)
    inv = np.linalg.inv(hom)
    den = inv[:, 2, 0, None, None] * qx + inv[:, 2, 1, None, None] * qy + inv[:, 2, 2, None, None]
    sx = (inv[:, 0, 0, None, None] * qx + inv[:, 0, 1, None, None] * qy + inv[:, 0, 2, None, None]) / den
    sy = (inv[:, 1, 0, None, None] * qx + inv[:, 1, 1, None, None] * qy + inv[:, 1, 2, None, None]) / den
    h, w = im.shape
    grid = np.stack([2 * sx / (w - 1) - 1, 2 * sy / (h - 1) - 1], -1).astype(np.float32)
    out = F.grid_sample(torch.from_numpy(im)[None, None], torch.from_numpy(grid.reshape(1, n * g, g, 2)),
                        mode="bilinear", padding_mode="reflection", align_corners=True)
    return out.numpy().reshape(n, g, g)


def _photometric(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per-view blur, gamma, contrast, bias, noise; crops the blur border; returns uint8 (n, P, P)."""
    p, n = PARAMS, len(x)
    sigma = np.maximum(rng.uniform(*p["blur_sigma_range"], n), 1e-3)  # ~1e-3: a delta kernel
    t = np.arange(-_PAD, _PAD + 1)
    ker = np.exp(-(t[None] ** 2) / (2 * sigma[:, None] ** 2))
    ker = (ker / ker.sum(1, keepdims=True)).astype(np.float32)
    win = np.lib.stride_tricks.sliding_window_view
    x = np.einsum("nijk,nk->nij", win(x, 2 * _PAD + 1, axis=2), ker)  # blur rows, crop columns
    x = np.einsum("njik,nk->nji", win(x, 2 * _PAD + 1, axis=1), ker)  # blur columns, crop rows
    gamma = np.exp(rng.uniform(*np.log(p["gamma_range"]), n)).astype(np.float32)[:, None, None]
    gain = np.exp(rng.uniform(*np.log(p["gain_range"]), n)).astype(np.float32)[:, None, None]
    bias = rng.uniform(-p["bias"], p["bias"], n).astype(np.float32)[:, None, None]
    noise = rng.uniform(*p["noise_sigma_range"], n).astype(np.float32)[:, None, None]
    x = np.clip(x, 0, 1) ** gamma
    # Contrast about the patch mean rather than a global gain: a global one saturates bright
    # patches to flat white, which carries no descriptor signal.
    mean = x.mean((1, 2), keepdims=True)
    x = (x - mean) * gain + mean + bias + noise * rng.standard_normal(x.shape, dtype=np.float32)
    return np.rint(np.clip(x, 0, 1) * 255).astype(np.uint8)


def _points_and_views(names: list[str], n: int, patch: int, rng: np.random.Generator) -> dict:
    """n points spread over the images, each with two views: image index, xy, scale, a, b."""
    images = [load_image(name) for name in names]
    kps = [_keypoints(im, rng) for im in images]
    alloc = _allocate(n, [len(xy) for xy, _ in kps])
    out: dict[str, list] = {k: [] for k in ("img", "xy", "scale", "a", "b")}
    for i, (im, (xy, s), m) in enumerate(zip(images, kps, alloc)):
        if m == 0:
            continue
        if len(xy) == 0:
            raise RuntimeError(f"synthetic: no textured keypoints found in {names[i]}")
        take = np.arange(m) % len(xy)  # cycles only if m exceeds the image's capacity
        angle = rng.uniform(-np.pi, np.pi, m)  # stands in for a detector's dominant orientation
        for c in range(0, m, _CHUNK):  # bounds the float64 sampling grids (~80 MB per chunk)
            t, ang = take[c : c + _CHUNK], angle[c : c + _CHUNK]
            for view in ("a", "b"):
                out[view].append(_photometric(_sample_views(im, xy[t], s[t], ang, patch, rng), rng))
        out["img"].append(np.full(m, i))
        out["xy"].append(xy[take])
        out["scale"].append(s[take])
    return {k: np.concatenate(v) for k, v in out.items()}


def _eval_negatives(pts: dict, neg: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For each point in ``neg`` a different point of ``neg``: a nearby point of the same image
    (hard) for hard_negative_fraction of them, a random other point for the rest. Partners are at
    least half a patch side away so a negative never shows essentially the same content."""
    img, xy, scale = pts["img"][neg], pts["xy"][neg], pts["scale"][neg]
    min_d = PARAMS["support"] * np.maximum(scale[:, None], scale[None, :])
    partner = np.full(len(neg), -1)
    hard = rng.random(len(neg)) < PARAMS["hard_negative_fraction"]
    for i in np.unique(img):
        idx = np.flatnonzero(img == i)
        d = np.linalg.norm(xy[idx, None] - xy[None, idx], axis=-1)
        d[d < min_d[np.ix_(idx, idx)]] = np.inf  # also excludes the point itself
        nearest = np.argsort(d, 1, kind="stable")[:, : PARAMS["hard_negative_k"]]
        for r, j in enumerate(idx):
            cand = nearest[r][np.isfinite(d[r, nearest[r]])]
            if hard[j] and cand.size:
                partner[j] = idx[cand[rng.integers(cand.size)]]
    todo = np.flatnonzero(partner < 0)
    while todo.size:  # random partners, redrawn while too close (same image) or itself
        draw = rng.integers(len(neg), size=todo.size)
        bad = (img[draw] == img[todo]) & (np.linalg.norm(xy[draw] - xy[todo], axis=1) < min_d[todo, draw])
        partner[todo[~bad]] = draw[~bad]
        todo = todo[bad]
    return neg[partner]


def _make_split(split: str, n_pairs: int, patch: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # Independent stream per split: changing train_pairs leaves the eval data unchanged.
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0 if split == "train" else 1]))
    pts = _points_and_views(source_images()[split], n_pairs, patch, rng)
    n = len(pts["img"])
    if split == "train":
        # All positive and every id in exactly one pair: hardest-in-batch mining takes every other
        # pair of a batch as a negative.
        ids = np.arange(n, dtype=np.int64)
        pairs = np.stack([pts["a"], pts["b"]], 1)
        labels = np.ones(n, np.uint8)
        id_pairs = np.stack([ids, ids], 1)
    else:
        ids = EVAL_ID_OFFSET + np.arange(n, dtype=np.int64)
        perm = rng.permutation(n)
        pos, neg = perm[: n // 2], perm[n // 2 :]
        partner = _eval_negatives(pts, neg, rng)
        a_idx = np.concatenate([pos, neg])
        b_idx = np.concatenate([pos, partner])
        pairs = np.stack([pts["a"][a_idx], pts["b"][b_idx]], 1)
        labels = np.concatenate([np.ones(pos.size, np.uint8), np.zeros(neg.size, np.uint8)])
        id_pairs = np.stack([ids[a_idx], ids[b_idx]], 1)
    order = rng.permutation(n)  # mix images (and labels) across blocks
    return pairs[order], labels[order], id_pairs[order]


def generate_synthetic(out_dir: str | os.PathLike, *, train_pairs: int = 20000, eval_pairs: int = 4000,
                       patch_size: int = 32, pairs_per_block: int = 256, blocks_per_shard: int = 8, seed: int = 0,
                       progress: bool = True) -> dict:
    """Write train/eval shards of synthetic pairs plus manifest.json to ``out_dir``; return the manifest.

    Deterministic given the arguments: the same call twice writes byte-identical shards.
    """
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
    for split, n in (("train", train_pairs), ("eval", eval_pairs)):
        pairs, labels, ids = _make_split(split, n, patch_size, seed)
        blocks = (PairBlock(pairs[i : i + pairs_per_block], labels[i : i + pairs_per_block],
                            ids[i : i + pairs_per_block]) for i in range(0, n, pairs_per_block))
        splits[split] = write_split(out, split, blocks, blocks_per_shard, progress=progress)
    return finish_conversion(out, source="synthetic", patch_size=patch_size, pairs_per_block=pairs_per_block,
                             generator={
            "name": "pipeline.data.synthetic", "seed": seed, "train_pairs": train_pairs, "eval_pairs": eval_pairs,
            "patch_size": patch_size, "pairs_per_block": pairs_per_block, "blocks_per_shard": blocks_per_shard,
            "images": source_images(), "eval_id_offset": EVAL_ID_OFFSET, **PARAMS,
        }, splits=splits)
