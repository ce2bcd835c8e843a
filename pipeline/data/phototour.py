"""UBC PhotoTour (Brown et al.: Liberty, Notre Dame, Yosemite) patches -> shards.

Two input formats are read:

* the raw release, a folder such as ``liberty/`` holding
    - ``patchesNNNN.bmp``: 1024x1024 grayscale tiles, each a 16x16 grid of 64x64 patches in
      row-major order, so patch id = tile * 256 + row * 16 + col. The last tile may be partly
      blank: only the first N patches exist, N being the number of lines of info.txt;
    - ``info.txt``: one line per patch, ``<3D point id> <unused>``;
    - ``m50_<n>_<n>_0.txt``: the evaluation pairs, one per line,
      ``patchID1 pointID1 unused patchID2 pointID2 unused``; a pair matches iff the point ids are equal
      (the benchmark's 100k pairs are ``m50_100000_100000_0.txt``);
    - ``interest.txt`` (keypoint geometry; not needed here);
* torchvision's cache of it, ``<name>.pt`` = ``torch.save((data, labels, matches))`` with data a
  uint8 tensor (N, 64, 64), labels an int64 tensor (N,) of 3D point ids and matches an int64
  tensor (M, 3) of ``[patch id 1, patch id 2, is_match]`` read from ``m50_100000_100000_0.txt``.

Training pairs follow HardNet's data generation: per pair pick a 3D point with at least two
patches, then two distinct patches of it; a point appears at most once per block (HardNet's
batch), so every other pair of a block is a true negative. Evaluation pairs are exactly the
pairs of the chosen m50 file, in file order. Shard ids are the 3D point ids.

Patches are resized from 64 to ``patch_size`` by area averaging (``resize_patches``). At 64 -> 32
that is the exact 2x2 mean rounded half up, which is what ``cv2.resize`` gives with INTER_AREA and
also with INTER_LINEAR (HardNet's PhotoTour transform, ``cv2.resize(x, (32, 32))``) at this factor.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline.data.shards import (finish_conversion, PairBlock, SourceError, distinct_per_block,
                                  write_split)

logger = logging.getLogger(__name__)

RAW_PATCH = 64
TILE_SIDE = 1024
GRID = TILE_SIDE // RAW_PATCH  # 16 patches per tile row
PER_TILE = GRID * GRID  # 256
DEFAULT_MATCH_FILE = "m50_100000_100000_0.txt"
_TILE_RE = re.compile(r"^patches(\d+)\.bmp$", re.IGNORECASE)
_M50_RE = re.compile(r"^m50_.*\.txt$")


# --- resizing -----------------------------------------------------------------------------------

def _area_weights(src: int, dst: int) -> np.ndarray:
    """(dst, src) matrix: weight of source pixel j in target pixel i = overlap of their footprints
    (target pixel i covers [i, i+1) * src/dst in source units) divided by the footprint length."""
    scale = src / dst
    lo = np.arange(dst)[:, None] * scale
    hi = lo + scale
    j = np.arange(src)[None, :]
    overlap = np.clip(np.minimum(hi, j + 1) - np.maximum(lo, j), 0, None)
    return overlap / overlap.sum(1, keepdims=True)


def resize_patches(patches: np.ndarray, size: int) -> np.ndarray:
    """uint8 (N, S, S) -> uint8 (N, size, size) by area averaging (box filter over each target
    pixel's footprint, like cv2 INTER_AREA / PIL BOX without PIL's intermediate 8-bit rounding),
    rounded half up. For S = 2 * size this is exactly ``(a + b + c + d + 2) // 4`` per 2x2 block."""
    n, s = patches.shape[0], patches.shape[-1]
    if s == size:
        return patches
    w = _area_weights(s, size).astype(np.float32)
    out = np.empty((n, size, size), np.uint8)
    for i in range(0, n, 4096):  # bounds the float32 temporaries
        x = patches[i : i + 4096].astype(np.float32)
        y = w @ x @ w.T
        out[i : i + 4096] = np.clip(np.floor(y + 0.5), 0, 255).astype(np.uint8)
    return out


# --- readers ------------------------------------------------------------------------------------

def read_info(path: str | os.PathLike) -> np.ndarray:
    """3D point id of every patch (int64 (N,)), from ``info.txt``."""
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"{path}: info.txt not found (UBC PhotoTour raw layout: patchesNNNN.bmp tiles, "
                          f"info.txt, m50_*.txt in one folder)")
    lines = path.read_text(encoding="ascii", errors="replace").rstrip().splitlines()
    out = np.empty(len(lines), np.int64)
    for i, line in enumerate(lines):
        fields = line.split()
        try:
            out[i] = int(fields[0])
        except (IndexError, ValueError):
            raise SourceError(f"{path}:{i + 1}: expected '<3D point id> <unused>', got {line!r}") from None
    if len(out) == 0:
        raise SourceError(f"{path}: empty, expected one line per patch")
    return out


def read_matches(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """An m50 file -> (patch ids int64 (M, 2), point ids int64 (M, 2)), in file order."""
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"{path}: match file not found")
    lines = path.read_text(encoding="ascii", errors="replace").rstrip().splitlines()
    vals = np.empty((len(lines), 6), np.int64)
    for i, line in enumerate(lines):
        fields = line.split()
        try:
            if len(fields) != 6:
                raise ValueError
            vals[i] = [int(f) for f in fields]
        except ValueError:
            raise SourceError(f"{path}:{i + 1}: expected 6 integers 'patchID1 pointID1 unused patchID2 pointID2 "
                              f"unused', got {line!r}") from None
    if len(vals) == 0:
        raise SourceError(f"{path}: empty, expected one pair per line")
    return vals[:, [0, 3]], vals[:, [1, 4]]


def _tile_files(root: Path) -> dict[int, Path]:
    return {int(m.group(1)): p for p in root.iterdir() if (m := _TILE_RE.match(p.name))}


def read_tiles(root: str | os.PathLike, n_patches: int, patch_size: int = RAW_PATCH,
               progress: bool = True) -> np.ndarray:
    """The first ``n_patches`` patches of the ``patchesNNNN.bmp`` tiles, uint8 (N, P, P), resized
    tile by tile (so memory stays at N * P * P bytes)."""
    root = Path(root)
    tiles = _tile_files(root)
    need = -(-n_patches // PER_TILE)
    missing = [i for i in range(need) if i not in tiles]
    if missing:
        raise SourceError(f"{root / f'patches{missing[0]:04d}.bmp'}: tile not found ({len(missing)} of the {need} "
                          f"tiles that the {n_patches} patches listed in info.txt need are missing)")
    if len(tiles) > need:
        logger.warning("%s: %d tile(s) beyond the %d that info.txt's %d patches need are ignored",
                       root, len(tiles) - need, need, n_patches)
    out = np.empty((n_patches, patch_size, patch_size), np.uint8)
    for t in tqdm(range(need), desc=f"phototour tiles {root.name}", unit="tile", disable=not progress,
                  file=sys.stderr):
        path = tiles[t]
        try:
            with Image.open(path) as im:
                if im.size != (TILE_SIDE, TILE_SIDE):
                    raise SourceError(f"{path}: tile is {im.size[0]}x{im.size[1]}, expected {TILE_SIDE}x{TILE_SIDE} "
                                      f"(16x16 patches of 64x64)")
                a = np.asarray(im.convert("L") if im.mode != "L" else im, dtype=np.uint8)
        except OSError as e:
            raise SourceError(f"{path}: not a readable image ({e})") from None
        patches = a.reshape(GRID, RAW_PATCH, GRID, RAW_PATCH).transpose(0, 2, 1, 3).reshape(PER_TILE, RAW_PATCH,
                                                                                           RAW_PATCH)
        k = min(PER_TILE, n_patches - t * PER_TILE)
        out[t * PER_TILE : t * PER_TILE + k] = resize_patches(patches[:k], patch_size)
    return out


@dataclass
class PhotoTour:
    """One PhotoTour dataset in memory."""

    patches: np.ndarray  # uint8 (N, P, P)
    point_ids: np.ndarray  # int64 (N,)
    match_patches: np.ndarray | None  # int64 (M, 2) patch ids of the evaluation pairs, file order
    match_labels: np.ndarray | None  # uint8 (M,)
    path: Path  # the folder or .pt file read
    format: str  # "raw" or "torchvision-pt"
    match_file: str | None  # the m50 file the pairs come from


def _choose_match_file(root: Path, match_file: str | None) -> Path:
    if match_file is not None:
        p = Path(match_file)
        p = p if p.is_absolute() else root / p
        if not p.is_file():
            raise SourceError(f"{p}: match file not found (m50 files in {root}: "
                              f"{sorted(q.name for q in root.glob('m50_*.txt'))})")
        return p
    if (root / DEFAULT_MATCH_FILE).is_file():
        return root / DEFAULT_MATCH_FILE
    found = sorted(q for q in root.iterdir() if _M50_RE.match(q.name))
    if len(found) == 1:
        return found[0]
    raise SourceError(f"{root / DEFAULT_MATCH_FILE}: not found and {len(found)} other m50_*.txt files "
                      f"({[q.name for q in found]}); pass match_file")


def load_phototour(root: str | os.PathLike, *, patch_size: int = RAW_PATCH, match_file: str | None = None,
                   need_matches: bool = True, progress: bool = True) -> PhotoTour:
    """Read a raw PhotoTour folder or torchvision's ``.pt`` cache; patches resized to ``patch_size``.

    ``match_file`` (raw folders only): an m50 file name inside the folder or a path; default
    ``m50_100000_100000_0.txt`` or the folder's only m50 file. The m50 point ids must agree with
    info.txt (checked; a disagreement is reported with its line).
    """
    path = Path(root)
    if path.is_file() and path.suffix == ".pt":
        if match_file is not None:
            raise SourceError(f"{path}: torchvision's .pt cache holds only its own m50_100000_100000_0 pairs; "
                              f"match_file={match_file!r} needs the raw folder")
        return _load_pt(path, patch_size)
    if not path.is_dir():
        raise SourceError(f"{path}: not found (expected a UBC PhotoTour folder or torchvision's <name>.pt cache)")
    info = path / "info.txt"
    if not info.is_file():
        raise SourceError(f"{info}: info.txt not found (UBC PhotoTour raw layout: patchesNNNN.bmp tiles, info.txt, "
                          f"m50_*.txt in one folder{'; or pass the torchvision .pt cache' if any(path.glob('*.pt')) else ''})")
    point_ids = read_info(info)
    match_patches = match_labels = None
    chosen = None
    if need_matches:
        mf = _choose_match_file(path, match_file)
        chosen = mf.name
        match_patches, match_points = read_matches(mf)
        bad = np.flatnonzero((match_patches >= len(point_ids)).any(1) | (match_patches < 0).any(1))
        if bad.size:
            raise SourceError(f"{mf}:{bad[0] + 1}: patch id out of range "
                              f"{match_patches[bad[0]].tolist()} (info.txt lists {len(point_ids)} patches)")
        bad = np.flatnonzero((point_ids[match_patches] != match_points).any(1))
        if bad.size:
            i = bad[0]
            raise SourceError(f"{mf}:{i + 1}: point ids {match_points[i].tolist()} disagree with info.txt "
                              f"({point_ids[match_patches[i]].tolist()} for patches {match_patches[i].tolist()})")
        match_labels = (match_points[:, 0] == match_points[:, 1]).astype(np.uint8)
    patches = read_tiles(path, len(point_ids), patch_size, progress)
    return PhotoTour(patches, point_ids, match_patches, match_labels, path, "raw", chosen)


def _load_pt(path: Path, patch_size: int) -> PhotoTour:
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad input file
        raise SourceError(f"{path}: not a readable torch file ({e})") from None
    if not (isinstance(obj, (tuple, list)) and len(obj) == 3 and all(isinstance(t, torch.Tensor) for t in obj)):
        raise SourceError(f"{path}: expected torchvision's PhotoTour cache, a tuple (data, labels, matches) of tensors")
    data, labels, matches = obj
    n = data.shape[0] if data.ndim else 0
    if not (data.dtype == torch.uint8 and data.ndim == 3 and tuple(data.shape[1:]) == (RAW_PATCH, RAW_PATCH)):
        raise SourceError(f"{path}: data must be uint8 (N, 64, 64), got {data.dtype} {tuple(data.shape)}")
    if not (labels.ndim == 1 and labels.shape[0] == n and not labels.is_floating_point()):
        raise SourceError(f"{path}: labels must be integer ({n},), got {labels.dtype} {tuple(labels.shape)}")
    if not (matches.ndim == 2 and matches.shape[1] == 3 and not matches.is_floating_point()):
        raise SourceError(f"{path}: matches must be integer (M, 3), got {matches.dtype} {tuple(matches.shape)}")
    point_ids = labels.numpy().astype(np.int64)
    m = matches.numpy().astype(np.int64)
    bad = np.flatnonzero((m[:, :2] >= n).any(1) | (m[:, :2] < 0).any(1))
    if bad.size:
        raise SourceError(f"{path}: matches row {bad[0]} has patch id out of range {m[bad[0], :2].tolist()} (N={n})")
    same = point_ids[m[:, 0]] == point_ids[m[:, 1]]
    bad = np.flatnonzero(same != (m[:, 2] == 1))
    if bad.size:
        raise SourceError(f"{path}: matches row {bad[0]} {m[bad[0]].tolist()} says is_match={m[bad[0], 2]} but the "
                          f"patches' point ids are {point_ids[m[bad[0], :2]].tolist()}")
    patches = resize_patches(data.numpy(), patch_size)
    return PhotoTour(patches, point_ids, m[:, :2], same.astype(np.uint8), path, "torchvision-pt",
                     DEFAULT_MATCH_FILE)


# --- pairs --------------------------------------------------------------------------------------

def _point_index(point_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(order, start, count, eligible): patches sorted by point; per point its first position in
    ``order`` and its patch count; ``eligible`` = points with at least two patches."""
    order = np.argsort(point_ids, kind="stable")
    _, start, count = np.unique(point_ids[order], return_index=True, return_counts=True)
    return order, start, count, np.flatnonzero(count >= 2)


def train_blocks(ds: PhotoTour, n_pairs: int, pairs_per_block: int, seed: int) -> Iterator[PairBlock]:
    """HardNet-style positive pairs: per block distinct points (>= 2 patches each), per pair two
    distinct patches of the point. Deterministic given ``seed``."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0]))
    order, start, count, eligible = _point_index(ds.point_ids)
    if eligible.size == 0:
        raise SourceError(f"{ds.path}: no 3D point has two or more patches; no positive pairs possible")
    for pick in distinct_per_block(rng, eligible.size, n_pairs, pairs_per_block, "3D points with >= 2 patches"):
        pts = eligible[pick]
        c = count[pts]
        n1 = rng.integers(0, c)
        n2 = rng.integers(0, c - 1)
        n2 = n2 + (n2 >= n1)
        i1, i2 = order[start[pts] + n1], order[start[pts] + n2]
        pid = ds.point_ids[i1]
        yield PairBlock(np.stack([ds.patches[i1], ds.patches[i2]], 1), np.ones(len(pts), np.uint8),
                        np.stack([pid, pid], 1))


def eval_blocks(ds: PhotoTour, pairs_per_block: int) -> Iterator[PairBlock]:
    """The match file's pairs in file order, ``pairs_per_block`` per block."""
    mp, lab = ds.match_patches, ds.match_labels
    for i in range(0, len(lab), pairs_per_block):
        p = mp[i : i + pairs_per_block]
        yield PairBlock(np.stack([ds.patches[p[:, 0]], ds.patches[p[:, 1]]], 1), lab[i : i + pairs_per_block],
                        ds.point_ids[p])


def phototour_eval_pairs(root: str | os.PathLike, *, match_file: str | None = None, patch_size: int = 32,
                         progress: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The benchmark's evaluation pairs as arrays (pairs uint8 (M, 2, P, P), labels uint8 (M,),
    ids int64 (M, 2)), in match-file order: for evaluating a model without writing shards."""
    ds = load_phototour(root, patch_size=patch_size, match_file=match_file, progress=progress)
    mp = ds.match_patches
    return np.stack([ds.patches[mp[:, 0]], ds.patches[mp[:, 1]]], 1), ds.match_labels, ds.point_ids[mp]


def phototour_to_shards(root: str | os.PathLike, out_dir: str | os.PathLike, *,
                        split: Literal["train", "eval", "both"] = "both", train_pairs: int = 500_000,
                        match_file: str | None = None, eval_root: str | os.PathLike | None = None,
                        patch_size: int = 32, pairs_per_block: int = 256, blocks_per_shard: int = 8, seed: int = 0,
                        progress: bool = True) -> dict:
    """Write PhotoTour shards (+ manifest.json) to ``out_dir``; return the manifest.

    ``root``: a raw PhotoTour folder (e.g. ``liberty/``) or torchvision's ``liberty.pt``.
    ``split``: which splits to write; train = ``train_pairs`` HardNet-style positive pairs from
    ``root``; eval = the pairs of ``match_file`` (default m50_100000_100000_0.txt) from
    ``eval_root`` (default ``root``; the usual protocol trains on one scene and evaluates on
    another, e.g. root=liberty, eval_root=notredame). Deterministic; an interrupted run re-run
    with the same arguments only writes the shards that are missing.
    """
    if split not in ("train", "eval", "both"):
        raise ValueError(f"split must be 'train', 'eval' or 'both', got {split!r}")
    if not 8 <= patch_size <= 256 or pairs_per_block < 1 or blocks_per_shard < 1:
        raise ValueError(f"bad patch_size/pairs_per_block/blocks_per_shard: {patch_size}, {pairs_per_block}, "
                         f"{blocks_per_shard}")
    if split in ("train", "both") and train_pairs < 1:
        raise ValueError(f"train_pairs must be >= 1, got {train_pairs}")
    todo = ["train", "eval"] if split == "both" else [split]
    eval_src = Path(eval_root) if eval_root is not None else Path(root)
    same_source = eval_src.resolve() == Path(root).resolve()
    if split == "both" and same_source:
        logger.warning("%s: train and eval pairs both come from this scene, so the eval pairs' 3D points are also "
                       "training points; the benchmark protocol evaluates on another scene (eval_root)", root)
    datasets: dict[str, PhotoTour] = {}
    if "train" in todo:
        need = "eval" in todo and same_source
        datasets["train"] = load_phototour(root, patch_size=patch_size, match_file=match_file if need else None,
                                           need_matches=need, progress=progress)
    if "eval" in todo:
        datasets["eval"] = (datasets["train"] if "train" in datasets and same_source else
                            load_phototour(eval_src, patch_size=patch_size, match_file=match_file, progress=progress))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)  # a crash leaves no manifest describing other shards
    common = {
        "name": "pipeline.data.phototour", "seed": seed, "patch_size": patch_size, "pairs_per_block": pairs_per_block,
        "blocks_per_shard": blocks_per_shard, "resize": f"area {RAW_PATCH}->{patch_size}, round half up",
    }
    per_split: dict[str, dict] = {}
    if "train" in datasets:
        ds = datasets["train"]
        _, _, count, eligible = _point_index(ds.point_ids)
        per_split["train"] = {"source": str(ds.path.resolve()), "format": ds.format, "pairs": train_pairs,
                              "patches": int(len(ds.point_ids)), "points": int(len(count)),
                              "points_with_2_patches": int(eligible.size),
                              "rule": "per block distinct 3D points; 2 distinct patches per point (HardNet)"}
    if "eval" in datasets:
        ds = datasets["eval"]
        per_split["eval"] = {"source": str(ds.path.resolve()), "format": ds.format, "match_file": ds.match_file,
                             "pairs": int(len(ds.match_labels)), "rule": "the match file's pairs, in file order"}
    splits = {}
    for s in todo:
        ds = datasets[s]
        blocks = (train_blocks(ds, train_pairs, pairs_per_block, seed) if s == "train"
                  else eval_blocks(ds, pairs_per_block))
        splits[s] = write_split(out, s, blocks, blocks_per_shard, progress=progress,
                                params={**common, s: per_split[s]})
    return finish_conversion(out, source="phototour", patch_size=patch_size, pairs_per_block=pairs_per_block,
                             generator={**common, **per_split}, splits=splits)


__all__ = ["DEFAULT_MATCH_FILE", "PhotoTour", "eval_blocks", "load_phototour", "phototour_eval_pairs",
           "phototour_to_shards", "read_info", "read_matches", "read_tiles", "resize_patches", "train_blocks"]
