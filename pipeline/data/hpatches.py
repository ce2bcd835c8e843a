"""HPatches patches (the ``hpatches-release`` folder) -> shards.

Layout: ``hpatches-release/<seq>/{ref,e1..e5,h1..h5,t1..t5}.png``; every png is a vertical stack
of 65x65 grayscale patches, patch k = rows 65k .. 65k+64, the same scene point in every file of the
sequence. ``ref`` is the reference image's patch; ``e``/``h``/``t`` are the same point in the other
five images of the sequence detected with easy / hard / tough geometric noise. Sequences named
``i_*`` change illumination, ``v_*`` viewpoint.

Splits (hpatches-benchmark's ``splits.json``): ``a``, ``b``, ``c`` are the official train/test
splits (40 test sequences each; train = the other 76) and are built in (``OFFICIAL_SPLITS``,
copied from hpatches/hpatches-benchmark python/utils/splits.json); ``illum`` = all ``i_*``,
``view`` = all ``v_*``, ``full`` = all sequences, as test sets (computed from the names found;
equal to the official lists on the complete release). Train sequences of any split = the
sequences present that are not in its test set, so ``full`` has none. A ``splits.json`` file of
the same structure (``{"name": {"test": [...], "train": [...]}, ...}``) may replace the built-in
lists; a split without a ``train`` list trains on the rest.

Pairs:
* train: all positive; per pair one point (distinct within a block, as HardNet's batches) and two
  distinct images of it among ``ref`` and the chosen difficulties' images;
* eval: 50 % positives (``ref`` patch k vs patch k of a random chosen-difficulty image) and 50 %
  negatives (``ref`` patch k vs patch j != k of such an image; j from the same sequence, another
  sequence, or either at random: ``negatives``), shuffled.

Shard ids: ``sequence_index << 32 | k`` with sequence_index the position of the sequence in the
sorted list of all sequences under the root (so ids are the same whichever split is written).
Patches are resized 65 -> ``patch_size`` by area averaging (``phototour.resize_patches``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline.data.phototour import resize_patches
from pipeline.data.shards import (finish_conversion, PairBlock, SourceError, distinct_per_block, iter_blocks,
                                  write_split)

logger = logging.getLogger(__name__)

HP_PATCH = 65
DIFFICULTIES = ("e", "h", "t")
IMAGE_NAMES = ("ref",) + tuple(f"{d}{i}" for d in DIFFICULTIES for i in range(1, 6))
ID_SHIFT = 32

# hpatches/hpatches-benchmark, python/utils/splits.json: the test lists of the official splits a, b, c
# (train = the other 76 sequences; the official train lists are exactly those complements).
OFFICIAL_SPLITS: dict[str, list[str]] = {
    "a": ["i_ajuntament", "i_resort", "i_table", "i_troulos", "i_bologna", "i_lionnight", "i_porta", "i_zion",
          "i_brooklyn", "i_fruits", "i_books", "i_bridger", "i_whitebuilding", "i_kurhaus", "i_salon", "i_autannes",
          "i_tools", "i_santuario", "i_fog", "i_nijmegen", "v_courses", "v_coffeehouse", "v_abstract", "v_feast",
          "v_woman", "v_talent", "v_tabletop", "v_bees", "v_strand", "v_fest", "v_yard", "v_underground", "v_azzola",
          "v_eastsouth", "v_yuri", "v_soldiers", "v_man", "v_pomegranate", "v_birdwoman", "v_busstop"],
    "b": ["i_fruits", "i_melon", "i_castle", "i_resort", "i_chestnuts", "i_kions", "i_kurhaus", "i_autannes",
          "i_duda", "i_partyfood", "i_ski", "i_dome", "i_greenhouse", "i_pencils", "i_porta", "i_lionday",
          "i_school", "i_bridger", "i_village", "i_fog", "v_astronautis", "v_bip", "v_charing", "v_woman", "v_feast",
          "v_yard", "v_churchill", "v_graffiti", "v_london", "v_sunseason", "v_posters", "v_bees", "v_apprentices",
          "v_birdwoman", "v_colors", "v_laptop", "v_there", "v_adam", "v_underground", "v_war"],
    "c": ["i_ski", "i_table", "i_troulos", "i_melon", "i_tools", "i_kions", "i_londonbridge", "i_nijmegen",
          "i_boutique", "i_parking", "i_steps", "i_fog", "i_leuven", "i_dc", "i_partyfood", "i_pool", "i_castle",
          "i_bologna", "i_smurf", "i_crownnight", "v_azzola", "v_tempera", "v_machines", "v_coffeehouse",
          "v_graffiti", "v_artisans", "v_maskedman", "v_talent", "v_bees", "v_dirtywall", "v_blueprint", "v_war",
          "v_adam", "v_pomegranate", "v_busstop", "v_weapons", "v_gardens", "v_feast", "v_man", "v_wounded"],
}
SPLIT_NAMES = ("a", "b", "c", "illum", "view", "full")
# The 116 sequences of the complete release (57 i_*, 59 v_*), hpatches-benchmark's "full" list, sorted.
OFFICIAL_SEQUENCES: tuple[str, ...] = (
    "i_ajuntament", "i_autannes", "i_bologna", "i_books", "i_boutique", "i_bridger", "i_brooklyn", "i_castle",
    "i_chestnuts", "i_contruction", "i_crownday", "i_crownnight", "i_dc", "i_dome", "i_duda", "i_fenis",
    "i_fog", "i_fruits", "i_gonnenberg", "i_greenhouse", "i_greentea", "i_indiana", "i_kions", "i_ktirio",
    "i_kurhaus", "i_leuven", "i_lionday", "i_lionnight", "i_londonbridge", "i_melon", "i_miniature",
    "i_nescafe", "i_nijmegen", "i_nuts", "i_objects", "i_parking", "i_partyfood", "i_pencils", "i_pinard",
    "i_pool", "i_porta", "i_resort", "i_salon", "i_santuario", "i_school", "i_ski", "i_smurf", "i_steps",
    "i_table", "i_tools", "i_toy", "i_troulos", "i_veggies", "i_village", "i_whitebuilding", "i_yellowtent",
    "i_zion", "v_abstract", "v_adam", "v_apprentices", "v_artisans", "v_astronautis", "v_azzola", "v_bark",
    "v_bees", "v_beyus", "v_bip", "v_bird", "v_birdwoman", "v_blueprint", "v_boat", "v_bricks", "v_busstop",
    "v_calder", "v_cartooncity", "v_charing", "v_churchill", "v_circus", "v_coffeehouse", "v_colors",
    "v_courses", "v_dirtywall", "v_dogman", "v_eastsouth", "v_feast", "v_fest", "v_gardens", "v_grace",
    "v_graffiti", "v_home", "v_laptop", "v_london", "v_machines", "v_man", "v_maskedman", "v_pomegranate",
    "v_posters", "v_samples", "v_soldiers", "v_strand", "v_sunseason", "v_tabletop", "v_talent", "v_tempera",
    "v_there", "v_underground", "v_vitro", "v_wall", "v_wapping", "v_war", "v_weapons", "v_woman",
    "v_wormhole", "v_wounded", "v_yard", "v_yuri",
)


def release_dir(root: str | os.PathLike) -> Path:
    """``root`` itself or its ``hpatches-release`` subfolder, whichever holds the sequences."""
    root = Path(root)
    if not root.is_dir():
        raise SourceError(f"{root}: not found (expected the hpatches-release folder)")
    sub = root / "hpatches-release"
    return sub if sub.is_dir() and not (root / "ref.png").exists() else root


def list_sequences(root: str | os.PathLike) -> list[str]:
    """Sorted names of the sequence folders (those holding a ref.png) under the release folder."""
    rel = release_dir(root)
    seqs = sorted(p.name for p in rel.iterdir() if p.is_dir() and (p / "ref.png").is_file())
    if not seqs:
        raise SourceError(f"{rel}: no HPatches sequences (folders <seq>/ref.png, e1..t5.png) found")
    return seqs


def load_splits_json(path: str | os.PathLike) -> dict[str, dict[str, list[str]]]:
    """Read a hpatches-benchmark style splits.json: {name: {"test": [...], "train": [...]?}}."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SourceError(f"{path}: splits file not found") from None
    except json.JSONDecodeError as e:
        raise SourceError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise SourceError(f"{path}: expected an object {{split name: {{'test': [...], 'train': [...]}}}}")
    out = {}
    for name, entry in raw.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("test"), list)
                and all(isinstance(s, str) for s in entry["test"])):
            raise SourceError(f"{path}: split {name!r} needs a 'test' list of sequence names")
        if "train" in entry and not (isinstance(entry["train"], list) and all(isinstance(s, str) for s in entry["train"])):
            raise SourceError(f"{path}: split {name!r}: 'train' must be a list of sequence names")
        out[name] = {k: list(entry[k]) for k in ("test", "train") if k in entry}
    return out


def split_sequences(root: str | os.PathLike, split_name: str = "a", splits_json: str | os.PathLike | None = None
                    ) -> dict[str, list[str]]:
    """{"train": [...], "test": [...]} sequence names (sorted) of an HPatches split.

    a/b/c: the official test lists (or ``splits_json``'s); illum/view/full: every i_* / v_* / any
    sequence present; train: the file's "train" list if it has one, else the sequences present not
    in test. Every listed sequence must be present under ``root``.
    """
    present = list_sequences(root)
    rel = release_dir(root)
    table = load_splits_json(splits_json) if splits_json is not None else {k: {"test": v} for k, v in OFFICIAL_SPLITS.items()}
    if split_name in table:
        test = table[split_name]["test"]
        train = table[split_name].get("train")
    elif split_name in ("illum", "view", "full"):
        prefix = {"illum": "i_", "view": "v_", "full": ""}[split_name]
        test, train = [s for s in present if s.startswith(prefix)], None
    else:
        raise ValueError(f"unknown HPatches split {split_name!r}; expected one of {sorted(set(SPLIT_NAMES) | set(table))}")
    if train is None:
        train = [s for s in present if s not in set(test)]
        if splits_json is None and split_name in OFFICIAL_SPLITS:
            absent = [s for s in OFFICIAL_SEQUENCES if s not in set(present)]
            if absent:
                logger.warning("%s: %d official HPatches sequence(s) absent (e.g. %s): split %r trains on the "
                               "%d present ones not in its test set", rel, len(absent), absent[0], split_name,
                               len(train))
    missing = [s for s in test + train if s not in set(present)]
    if missing:
        raise SourceError(f"{rel / missing[0]}: sequence of split {split_name!r} not found ({len(missing)} of its "
                          f"{len(test) + len(train)} sequences are missing; {len(present)} present)")
    overlap = sorted(set(test) & set(train))
    if overlap:
        raise SourceError(f"split {split_name!r}: sequences in both train and test: {overlap[:5]}")
    return {"train": sorted(train), "test": sorted(test)}


def images_for(difficulties: str) -> tuple[str, ...]:
    """The non-reference image names of the chosen difficulties, e.g. "eh" -> e1..e5, h1..h5."""
    bad = set(difficulties) - set(DIFFICULTIES)
    if not difficulties or bad:
        raise ValueError(f"difficulties must be a non-empty combination of 'e', 'h', 't', got {difficulties!r}")
    return tuple(f"{d}{i}" for d in DIFFICULTIES if d in difficulties for i in range(1, 6))


def read_stack(path: Path) -> np.ndarray:
    """One HPatches png -> uint8 (n, 65, 65)."""
    try:
        with Image.open(path) as im:
            a = np.asarray(im.convert("L") if im.mode != "L" else im, dtype=np.uint8)
    except FileNotFoundError:
        raise SourceError(f"{path}: image not found") from None
    except OSError as e:
        raise SourceError(f"{path}: not a readable image ({e})") from None
    h, w = a.shape
    if w != HP_PATCH or h == 0 or h % HP_PATCH:
        raise SourceError(f"{path}: {w}x{h} is not a vertical stack of {HP_PATCH}x{HP_PATCH} patches "
                          f"(width {HP_PATCH}, height a multiple of {HP_PATCH})")
    return a.reshape(h // HP_PATCH, HP_PATCH, HP_PATCH)


def load_sequence(seq_dir: str | os.PathLike, images: tuple[str, ...], patch_size: int) -> np.ndarray:
    """uint8 (len(images), n_points, P, P): the sequence's patches of ``images``, resized."""
    seq_dir = Path(seq_dir)
    stacks = []
    for name in images:
        s = read_stack(seq_dir / f"{name}.png")
        if stacks and len(s) != stacks[0].shape[0]:
            raise SourceError(f"{seq_dir / (name + '.png')}: {len(s)} patches, but {images[0]}.png has "
                              f"{stacks[0].shape[0]} (every image of a sequence stacks the same points)")
        stacks.append(resize_patches(s, patch_size))
    return np.stack(stacks)


class _Pool:
    """The patches of a set of sequences, flattened over points: point p = (sequence, k)."""

    def __init__(self, rel: Path, names: list[str], all_names: list[str], images: tuple[str, ...], patch_size: int,
                 progress: bool, desc: str) -> None:
        self.images = images
        self.data = [load_sequence(rel / n, images, patch_size)
                     for n in tqdm(names, desc=desc, unit="seq", disable=not progress, file=sys.stderr)]
        sizes = np.array([d.shape[1] for d in self.data])
        if sizes.size and sizes.max() >= 1 << ID_SHIFT:
            raise SourceError(f"{rel}: a sequence has more than 2**{ID_SHIFT} patches")
        self.seq = np.repeat(np.arange(len(names)), sizes)
        self.k = np.concatenate([np.arange(n) for n in sizes]) if sizes.size else np.zeros(0, np.int64)
        index = {n: i for i, n in enumerate(all_names)}
        self.ids = (np.array([index[n] for n in names], np.int64)[self.seq] << ID_SHIFT) + self.k
        self.n_points = int(sizes.sum())
        self.seq_start = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)

    def patches(self, point: np.ndarray, image: np.ndarray) -> np.ndarray:
        """uint8 (n, P, P): patch of ``point[i]`` in image index ``image[i]``."""
        out = np.empty((len(point),) + self.data[0].shape[2:], np.uint8)
        seq = self.seq[point]
        for s in np.unique(seq):
            m = seq == s
            out[m] = self.data[s][image[m], self.k[point[m]]]
        return out


def _train_blocks(pool: _Pool, n_pairs: int, pairs_per_block: int, rng: np.random.Generator) -> Iterator[PairBlock]:
    n_img = len(pool.images)
    for pts in distinct_per_block(rng, pool.n_points, n_pairs, pairs_per_block, "HPatches points"):
        a = rng.integers(0, n_img, len(pts))
        b = rng.integers(0, n_img - 1, len(pts))
        b = b + (b >= a)
        ids = pool.ids[pts]
        yield PairBlock(np.stack([pool.patches(pts, a), pool.patches(pts, b)], 1), np.ones(len(pts), np.uint8),
                        np.stack([ids, ids], 1))


def _eval_arrays(pool: _Pool, n_pairs: int | None, negatives: str, rng: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n_pos = pool.n_points if n_pairs is None else n_pairs // 2
    n_neg = n_pos if n_pairs is None else n_pairs - n_pos
    anchor = rng.choice(pool.n_points, n_pos, replace=n_pos > pool.n_points)
    neg_anchor = rng.choice(pool.n_points, n_neg, replace=n_neg > pool.n_points)
    n_seq = len(pool.data)
    sizes = np.array([d.shape[1] for d in pool.data])
    mode = {"intra": np.zeros(n_neg, bool), "inter": np.ones(n_neg, bool),
            "mixed": rng.random(n_neg) < 0.5}[negatives]
    mode &= n_seq > 1  # a single sequence has only intra-sequence negatives
    s = pool.seq[neg_anchor]
    # intra: another point of the same sequence; inter: any point of another sequence
    other_seq = np.where(mode, (s + rng.integers(1, max(n_seq, 2), n_neg)) % max(n_seq, 1), s)
    if (~mode & (sizes[s] < 2)).any():
        bad = int(s[~mode & (sizes[s] < 2)][0])
        raise SourceError(f"sequence #{bad} has a single patch: no intra-sequence negative possible")
    j = rng.integers(0, np.maximum(sizes[other_seq] - (~mode), 1))
    kk = pool.k[neg_anchor]
    j = np.where(~mode & (j >= kk), j + 1, j)  # skip k itself within the same sequence
    partner = pool.seq_start[other_seq] + j
    n_img = len(pool.images)
    img_pos = rng.integers(1, n_img, n_pos)  # a non-reference image (index 0 is ref)
    img_neg = rng.integers(1, n_img, n_neg)
    first = np.concatenate([anchor, neg_anchor])
    second = np.concatenate([anchor, partner])
    pairs = np.stack([pool.patches(first, np.zeros(len(first), np.int64)),
                      pool.patches(second, np.concatenate([img_pos, img_neg]))], 1)
    labels = np.concatenate([np.ones(n_pos, np.uint8), np.zeros(n_neg, np.uint8)])
    ids = np.stack([pool.ids[first], pool.ids[second]], 1)
    order = rng.permutation(len(labels))
    return pairs[order], labels[order], ids[order]


def _check(split: str, difficulties: str, negatives: str, patch_size: int, pairs_per_block: int,
           blocks_per_shard: int) -> None:
    if split not in ("train", "eval", "both"):
        raise ValueError(f"split must be 'train', 'eval' or 'both', got {split!r}")
    images_for(difficulties)
    if negatives not in ("intra", "inter", "mixed"):
        raise ValueError(f"negatives must be 'intra', 'inter' or 'mixed', got {negatives!r}")
    if not 8 <= patch_size <= 256 or pairs_per_block < 1 or blocks_per_shard < 1:
        raise ValueError(f"bad patch_size/pairs_per_block/blocks_per_shard: {patch_size}, {pairs_per_block}, "
                         f"{blocks_per_shard}")


def hpatches_pairs(root: str | os.PathLike, *, split_name: str = "a", difficulties: str = "eht",
                   eval_pairs: int | None = None, negatives: Literal["intra", "inter", "mixed"] = "mixed",
                   splits_json: str | os.PathLike | None = None, patch_size: int = 32, seed: int = 0,
                   progress: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The eval pairs of a split's test sequences as arrays (pairs, labels, ids); the same pairs
    that ``hpatches_to_shards(..., split="eval")`` writes with the same arguments."""
    _check("eval", difficulties, negatives, patch_size, 1, 1)
    rel = release_dir(root)
    names = split_sequences(root, split_name, splits_json)["test"]
    if not names:
        raise SourceError(f"{rel}: HPatches split {split_name!r} has no test sequences")
    pool = _Pool(rel, names, list_sequences(root), ("ref",) + images_for(difficulties), patch_size, progress,
                 "hpatches eval")
    return _eval_arrays(pool, eval_pairs, negatives, np.random.default_rng(np.random.SeedSequence([seed, 1])))


def hpatches_to_shards(root: str | os.PathLike, out_dir: str | os.PathLike, *,
                       split: Literal["train", "eval", "both"] = "both", split_name: str = "a",
                       difficulties: str = "eht", train_pairs: int | None = None, eval_pairs: int | None = None,
                       negatives: Literal["intra", "inter", "mixed"] = "mixed",
                       splits_json: str | os.PathLike | None = None, patch_size: int = 32, pairs_per_block: int = 256,
                       blocks_per_shard: int = 8, seed: int = 0, progress: bool = True) -> dict:
    """Write HPatches shards (+ manifest.json) to ``out_dir``; return the manifest.

    train = the split's train sequences (``train_pairs`` positive pairs, default one per point),
    eval = its test sequences (``eval_pairs`` pairs, half positive; default one positive and one
    negative per point). ``difficulties``: which of e/h/t images pair with ``ref``.
    """
    _check(split, difficulties, negatives, patch_size, pairs_per_block, blocks_per_shard)
    rel = release_dir(root)
    seqs = split_sequences(root, split_name, splits_json)
    all_names = list_sequences(root)
    todo = ["train", "eval"] if split == "both" else [split]
    for s in todo:
        key = "train" if s == "train" else "test"
        if not seqs[key]:
            raise SourceError(f"{rel}: HPatches split {split_name!r} has no {key} sequences"
                              + (" (it puts every sequence in test; use a, b or c to train)" if key == "train" else ""))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)
    common = {"name": "pipeline.data.hpatches", "root": str(rel.resolve()), "split_name": split_name,
              "splits_json": str(Path(splits_json).resolve()) if splits_json is not None else "official (built in)",
              "difficulties": difficulties, "seed": seed, "patch_size": patch_size, "pairs_per_block": pairs_per_block,
              "blocks_per_shard": blocks_per_shard, "resize": f"area {HP_PATCH}->{patch_size}, round half up",
              "id": f"sequence_index << {ID_SHIFT} | patch index, sequences sorted by name"}
    per_split: dict[str, dict] = {}
    splits = {}
    for s in todo:
        names = seqs["train" if s == "train" else "test"]
        images = ("ref",) + images_for(difficulties)
        pool = _Pool(rel, names, all_names, images, patch_size, progress, f"hpatches {s}")
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0 if s == "train" else 1]))
        if s == "train":
            n = train_pairs if train_pairs is not None else pool.n_points
            if n < 1:
                raise ValueError(f"train_pairs must be >= 1, got {n}")
            blocks = _train_blocks(pool, n, pairs_per_block, rng)
            per_split[s] = {"sequences": names, "points": pool.n_points, "pairs": n,
                            "rule": "per block distinct points; 2 distinct images of ref + difficulties"}
        else:
            if eval_pairs is not None and eval_pairs < 2:
                raise ValueError(f"eval_pairs must be >= 2, got {eval_pairs}")
            pairs, labels, ids = _eval_arrays(pool, eval_pairs, negatives, rng)
            blocks = iter_blocks(pairs, labels, ids, pairs_per_block)
            per_split[s] = {"sequences": names, "points": pool.n_points, "pairs": int(len(labels)),
                            "negatives": negatives, "rule": "ref vs difficulty image; 50% positives"}
        splits[s] = write_split(out, s, blocks, blocks_per_shard, progress=progress, params={**common, s: per_split[s]})
        del pool
    return finish_conversion(out, source="hpatches", patch_size=patch_size, pairs_per_block=pairs_per_block,
                             generator={**common, **per_split}, splits=splits)


__all__ = ["IMAGE_NAMES", "OFFICIAL_SEQUENCES", "OFFICIAL_SPLITS", "SPLIT_NAMES", "hpatches_pairs", "hpatches_to_shards", "images_for",
           "list_sequences", "load_sequence", "load_splits_json", "read_stack", "release_dir", "split_sequences"]
