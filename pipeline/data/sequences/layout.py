"""Reading a sequence folder: its layout (HPatches ``1.ppm``/``H_1_k`` or Oxford ``img1.png``/``H1tokp``),
its images and its homography files, with one clear error per bad file."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

from pipeline.data.shards import SourceError

IMAGE_EXTS = (".png", ".ppm", ".pgm", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")

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


def _as_dirs(dirs: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    items = [dirs] if isinstance(dirs, (str, os.PathLike)) else list(dirs)
    out: list[Path] = []
    for d in items:
        out.extend(find_sequences(d))
    return out
