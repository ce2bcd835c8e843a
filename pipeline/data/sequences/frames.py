"""Detector-frame geometry on local affine frames (LAFs, float64 (n, 2, 3) in pixels, ``[A | c]``: the
patch samples c + A [-1, 1]^2): scale and angle, inside checks, the homography's local affine map,
detector-like jitter, region overlap, and patch extraction."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.data.sequences.params import PARAMS


def _to_tensor(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img))[None, None]


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


def laf_angle(lafs: np.ndarray) -> np.ndarray:
    """Direction (radians) of each frame's first axis, kornia's ``get_laf_orientation`` convention."""
    return np.arctan2(lafs[:, 0, 1], lafs[:, 0, 0])


def laf_scale(lafs: np.ndarray) -> np.ndarray:
    return np.sqrt(np.abs(np.linalg.det(lafs[:, :, :2])))


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


def jitter_frames(lafs: np.ndarray, rng: np.random.Generator, rotate: bool = True) -> np.ndarray:
    """Detector-like noise on frames: centre shift, log-uniform scale, rotation (``PARAMS``).
    ``rotate=False``: no rotation, so upright frames stay upright (an upright detector's noise)."""
    n = len(lafs)
    p = PARAMS
    s = laf_scale(lafs)
    shift = rng.uniform(-p["position_jitter"], p["position_jitter"], (n, 2)) * s[:, None]
    sj = np.exp(rng.uniform(-np.log1p(p["scale_jitter"]), np.log1p(p["scale_jitter"]), n))
    th = (np.deg2rad(rng.uniform(-p["orientation_jitter_deg"], p["orientation_jitter_deg"], n)) if rotate
          else np.zeros(n))
    out = lafs.copy()
    out[:, :, :2] = (lafs[:, :, :2] @ _rotations(th)) * sj[:, None, None]
    out[:, :, 2] += shift
    return out


def _rotations(th: np.ndarray) -> np.ndarray:
    """(n, 2, 2) rotation matrices by angles ``th`` (radians)."""
    return np.stack([np.stack([np.cos(th), -np.sin(th)], -1), np.stack([np.sin(th), np.cos(th)], -1)], -2)


def upright_frames(lafs: np.ndarray) -> np.ndarray:
    """The upright frames of the same centres and areas: A -> sqrt(|det A|) I (orientation 0, isotropic).
    Applied to frames carried into image k, it gives what an upright detector finds there: H(c) and
    H's local scale, no rotation and no shear."""
    out = lafs.copy()
    out[:, :, :2] = laf_scale(lafs)[:, None, None] * np.eye(2)
    return out


def affine_jitter(lafs: np.ndarray, rng: np.random.Generator, level: float, rotate: bool = True) -> np.ndarray:
    """HPatches-style affine jitter in each frame's own coordinates (units of its radius): centre
    c + A t, axes A R(theta) diag(s1, s2), with t uniform per axis in +-level, theta uniform in
    +-level radians (0 if not ``rotate``: upright frames stay upright), log s1 and log s2 uniform in
    +-level. Each part moves the frame's boundary by up to about ``level`` radii. On frames carried
    into image k this equals jittering the image-1 frame and reprojecting it (HPatches' order) up to
    H's curvature across the shift."""
    n = len(lafs)
    t = rng.uniform(-level, level, (n, 2))
    th = rng.uniform(-level, level, n) if rotate else np.zeros(n)
    scales = np.exp(rng.uniform(-level, level, (n, 2)))
    out = lafs.copy()
    out[:, :, :2] = lafs[:, :, :2] @ _rotations(th) * scales[:, None, :]
    out[:, :, 2] += np.einsum("nij,nj->ni", lafs[:, :, :2], t)
    return out


def rotate_frames(lafs: np.ndarray, rng: np.random.Generator, degrees: float) -> np.ndarray:
    """Frames turned about their centres by angles uniform in +-``degrees`` (orientation errors)."""
    out = lafs.copy()
    out[:, :, :2] = lafs[:, :, :2] @ _rotations(np.deg2rad(rng.uniform(-degrees, degrees, len(lafs))))
    return out


def _square_reach(max_turn: float) -> float:
    """Half-side, in radii, of the axis-aligned square (in frame axes) holding the frame's square
    turned by up to ``max_turn`` radians."""
    th = min(max_turn, np.pi / 4)  # |cos| + |sin| is largest at 45 degrees
    return float(np.cos(th) + np.sin(th))


def ellipse_overlap(lafs_a: np.ndarray, lafs_b: np.ndarray, grid: int = 64) -> np.ndarray:
    """|Ea & Eb| / |Ea | Eb| of the frames' regions E = {c + A u : |u| <= 1} (n,), on a grid of
    ``grid`` x ``grid`` points per pair in frame a's coordinates (overlap is affine-invariant), over a
    box that holds both regions: accurate to about 1 / grid."""
    inv = np.linalg.inv(lafs_a[:, :, :2])
    b_axes = inv @ lafs_b[:, :, :2]  # region b in a's unit-disc coordinates: t + B u
    t = np.einsum("nij,nj->ni", inv, lafs_b[:, :, 2] - lafs_a[:, :, 2])
    half = np.maximum(1.0, np.abs(t) + np.linalg.norm(b_axes, axis=2))  # per-axis half-width of both
    u = (np.arange(grid) + 0.5) / grid * 2 - 1
    b_inv = np.linalg.inv(b_axes)
    quad = np.einsum("nki,nkj->nij", b_inv, b_inv)  # inside b: |B^-1 (p - t)|^2 = (p - t)^T Q (p - t) <= 1
    out = np.empty(len(lafs_a))
    for lo in range(0, len(lafs_a), 256):  # chunks bound the memory: 256 x grid^2 points
        sl = slice(lo, lo + 256)
        # the grid as a row of x and a column of y, broadcast: elementwise work only (an einsum over
        # (n, grid, grid, 2) points took 26x as long for the same result)
        x, y = u[None, None, :] * half[sl, 0, None, None], u[None, :, None] * half[sl, 1, None, None]
        in_a = x**2 + y**2 <= 1
        dx, dy, q = x - t[sl, 0, None, None], y - t[sl, 1, None, None], quad[sl, :, :, None, None]
        in_b = q[:, 0, 0] * dx**2 + 2 * q[:, 0, 1] * dx * dy + q[:, 1, 1] * dy**2 <= 1
        out[sl] = (in_a & in_b).sum((1, 2)) / np.maximum((in_a | in_b).sum((1, 2)), 1)
    return out


def extract(img: torch.Tensor, lafs: np.ndarray, patch_size: int) -> np.ndarray:
    """uint8 (n, P, P) patches of ``lafs`` (pixels) from ``img`` (1, 1, H, W) in [0, 1]."""
    import kornia.feature as KF

    if len(lafs) == 0:
        return np.zeros((0, patch_size, patch_size), np.uint8)
    with torch.no_grad():
        p = KF.extract_patches_from_pyramid(img, torch.from_numpy(lafs).float()[None], PS=patch_size)
    return np.clip(np.floor(p[0, :, 0].numpy() * 255.0 + 0.5), 0, 255).astype(np.uint8)
