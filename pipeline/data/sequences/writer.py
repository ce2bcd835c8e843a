"""Writing sequence pairs as shards (+ manifest.json): per-sequence arrays re-cut into blocks."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Iterable, Iterator, Literal, Sequence

import numpy as np
from tqdm import tqdm

from pipeline.data.sequences.constructions import DEFAULT, Construction, get_construction
from pipeline.data.sequences.correspondence import _correspondences
from pipeline.data.sequences.layout import ImageSequence, _as_dirs, _targets, open_sequence
from pipeline.data.sequences.pairs import ID_SHIFT, _check, _rng, _train_pairs, eval_pairs
from pipeline.data.sequences.params import PARAMS
from pipeline.data.shards import finish_conversion, PairBlock, SourceError, write_split


def _rebatch(chunks: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]], k: int) -> Iterator[PairBlock]:
    """Concatenate per-sequence arrays and cut them into blocks of exactly k (the last may be short)."""
    buf: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    held = 0
    for chunk in chunks:
        buf.append(chunk)
        held += len(chunk[1])
        if held >= k:
            pairs, labels, ids = (np.concatenate([c[i] for c in buf]) for i in range(3))
            n_full = held // k * k
            for i in range(0, n_full, k):
                yield PairBlock(pairs[i : i + k], labels[i : i + k], ids[i : i + k])
            buf = [(pairs[n_full:], labels[n_full:], ids[n_full:])] if held > n_full else []
            held -= n_full
    if held:
        pairs, labels, ids = (np.concatenate([c[i] for c in buf]) for i in range(3))
        yield PairBlock(pairs, labels, ids)


def sequence_to_shards(seq_dirs: str | os.PathLike | Iterable[str | os.PathLike], out_dir: str | os.PathLike, *,
                       split: Literal["train", "eval", "both"] = "eval",
                       eval_dirs: str | os.PathLike | Iterable[str | os.PathLike] | None = None,
                       pairs_per_sequence: int | None = None, targets: Sequence[int] | None = None, seed: int = 0,
                       patch_size: int = 32, max_keypoints: int = 2000, pairs_per_block: int = 256,
                       blocks_per_shard: int = 8, redetect: bool = False, progress: bool = True,
                       construction: str | Construction = DEFAULT) -> dict:
    """Write shards (+ manifest.json) of pairs from image sequences to ``out_dir``; return the manifest.

    ``seq_dirs``: sequence folders, or folders of them (e.g. hpatches-sequences-release/), for
    ``split`` "train" or "eval"; with "both", ``seq_dirs`` feed train and ``eval_dirs`` (required,
    disjoint) feed eval. ``pairs_per_sequence``: default every correspondence once (eval adds as many
    negatives). Train pairs are all positive, a point at most once per block. ``redetect`` and
    ``construction`` (recorded in the manifest's generator section): as in ``sequence_pairs``.
    """
    how = get_construction(construction)
    if split not in ("train", "eval", "both"):
        raise ValueError(f"split must be 'train', 'eval' or 'both', got {split!r}")
    _check(patch_size, max_keypoints, pairs_per_sequence, 1 if split == "train" else 2)
    if pairs_per_block < 1 or blocks_per_shard < 1:
        raise ValueError(f"bad pairs_per_block/blocks_per_shard: {pairs_per_block}, {blocks_per_shard}")
    if split == "both" and eval_dirs is None:
        raise ValueError("split='both' needs eval_dirs (sequences for eval, disjoint from seq_dirs)")
    if split != "both" and eval_dirs is not None:
        raise ValueError(f"eval_dirs is only used with split='both' (got split={split!r})")
    lists = ({"train": _as_dirs(seq_dirs), "eval": _as_dirs(eval_dirs)} if split == "both"
             else {split: _as_dirs(seq_dirs)})
    if split == "both":
        shared = {p.resolve() for p in lists["train"]} & {p.resolve() for p in lists["eval"]}
        if shared:
            raise ValueError(f"sequences in both train and eval: {sorted(map(str, shared))[:3]}")
    seqs = {s: [open_sequence(d) for d in dirs] for s, dirs in lists.items()}
    for ss in seqs.values():  # fail on a missing image / H file before the slow part
        for q in ss:
            for k in _targets(q, targets):
                if not q.homography_path(k).is_file():
                    raise SourceError(f"{q.homography_path(k)}: homography file not found")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)
    common = {"name": "pipeline.data.sequences", "seed": seed, "patch_size": patch_size,
              "pairs_per_block": pairs_per_block, "blocks_per_shard": blocks_per_shard,
              "max_keypoints": max_keypoints, "redetect": redetect, "targets": list(targets) if targets is not None else "all",
              "pairs_per_sequence": pairs_per_sequence, "id": f"sequence_index << {ID_SHIFT} | keypoint index",
              **PARAMS, "construction": how.params()}
    per_split: dict[str, dict] = {}
    splits = {}
    index = 0
    for s, ss in seqs.items():
        first_index = index
        index += len(ss)
        per_split[s] = {"sequences": [str(q.path.resolve()) for q in ss], "first_sequence_index": first_index}
        counts: list[int] = []

        def chunks(s: str = s, ss: list[ImageSequence] = ss, first_index: int = first_index,
                   counts: list[int] = counts) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
            offset = 0
            for i, q in enumerate(tqdm(ss, desc=f"sequences {s}", unit="seq", disable=not progress,
                                       file=sys.stderr)):
                cor = _correspondences(q, targets, patch_size, max_keypoints, redetect, how)
                rng, base = _rng(seed, s, i), (first_index + i) << ID_SHIFT
                arrays = (_train_pairs(cor, pairs_per_sequence, offset, pairs_per_block, rng, patch_size, base)
                          if s == "train" else eval_pairs(cor, pairs_per_sequence, rng, patch_size, base))
                offset += len(arrays[1])
                counts.append(len(arrays[1]))
                yield arrays

        splits[s] = write_split(out, s, _rebatch(chunks(), pairs_per_block), blocks_per_shard, progress=progress,
                                params={**common, s: per_split[s]})
        per_split[s]["pairs_per_sequence"] = counts
    return finish_conversion(out, source="sequences", patch_size=patch_size, pairs_per_block=pairs_per_block,
                             generator={**common, **per_split}, splits=splits)
