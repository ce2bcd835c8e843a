"""The training stream on real tar shards: equal batches per rank, disjoint shards, seeded order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.data.shards import PairBlock, shard_paths, write_manifest, write_split
from pipeline.data.stream import StreamError, TrainStream, check_shard_count, load_pairs, train_loader
from pipeline.augment import fliprot, make_jitter

PAIRS_PER_BLOCK, BLOCKS_PER_SHARD, N_SHARDS = 16, 2, 6


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    """6 train shards of 32 pairs; pixel (0,0) of patch a encodes the pair id so we can trace pairs."""
    out = tmp_path_factory.mktemp("stream")
    rng = np.random.default_rng(0)

    def blocks(split, n_blocks, start):
        for b in range(n_blocks):
            ids = np.arange(start + b * PAIRS_PER_BLOCK, start + (b + 1) * PAIRS_PER_BLOCK, dtype=np.int64)
            pairs = rng.integers(0, 256, (PAIRS_PER_BLOCK, 2, 32, 32), dtype=np.uint8)
            labels = np.ones(PAIRS_PER_BLOCK, np.uint8) if split == "train" else (ids % 2).astype(np.uint8)
            other = np.where(labels == 1, ids, ids + 10_000)  # ids equal iff the pair is positive
            yield PairBlock(pairs=pairs, labels=labels, ids=np.stack([ids, other], 1))

    manifest = {"schema_version": 1, "source": "test", "patch_size": 32, "pairs_per_block": PAIRS_PER_BLOCK,
                "generator": {}, "created": "2026-11-25T00:00:00Z", "splits": {}}
    manifest["splits"]["train"] = write_split(out, "train", blocks("train", N_SHARDS * BLOCKS_PER_SHARD, 0), BLOCKS_PER_SHARD, progress=False)
    manifest["splits"]["eval"] = write_split(out, "eval", blocks("eval", 4, 50_000), BLOCKS_PER_SHARD, progress=False)
    write_manifest(out, manifest)
    return out


def ids_of(batches):
    return [int(i) for b in batches for i in b["ids"][:, 0]]


@pytest.mark.parametrize("loader_workers", [0, 2])
def test_every_rank_yields_the_same_number_of_full_batches(shard_dir, loader_workers):
    urls = shard_paths(shard_dir, "train")
    for world in (1, 2, 3):
        for rank in range(world):
            loader = train_loader(urls, loader_workers=loader_workers, rank=rank, world_size=world, epoch=0,
                                  batch_size=8, batches_per_epoch=7, shuffle_buffer=24, seed=1)
            batches = list(loader)
            assert len(batches) == 7
            assert all(b["pairs"].shape == (8, 2, 32, 32) and b["pairs"].dtype == torch.uint8 for b in batches)


def test_ranks_read_disjoint_shards_that_cover_the_split(shard_dir):
    urls = shard_paths(shard_dir, "train")
    per_rank_pairs = N_SHARDS // 2 * BLOCKS_PER_SHARD * PAIRS_PER_BLOCK
    seen = []
    for rank in range(2):
        stream = TrainStream(urls, rank=rank, world_size=2, epoch=0, batch_size=8,
                             batches_per_epoch=per_rank_pairs // 8, shuffle_buffer=0, seed=0)
        ids = ids_of(stream)
        assert len(ids) == len(set(ids)) == per_rank_pairs  # one full pass, no repeats
        seen.append(set(ids))
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(N_SHARDS * BLOCKS_PER_SHARD * PAIRS_PER_BLOCK))


def test_order_is_seeded_per_epoch(shard_dir):
    urls = shard_paths(shard_dir, "train")
    kw = dict(rank=0, world_size=2, batch_size=8, batches_per_epoch=6, shuffle_buffer=16)
    first = ids_of(TrainStream(urls, epoch=0, seed=3, **kw))
    assert first == ids_of(TrainStream(urls, epoch=0, seed=3, **kw))
    assert first != ids_of(TrainStream(urls, epoch=1, seed=3, **kw))


def test_too_few_shards_is_a_clear_error(shard_dir):
    urls = shard_paths(shard_dir, "train")
    with pytest.raises(StreamError, match=r"6 shard\(s\) but 4 rank\(s\) x 2 loader worker\(s\)"):
        check_shard_count(len(urls), 4, 2)
    with pytest.raises(StreamError):
        train_loader(urls, loader_workers=2, rank=0, world_size=4, epoch=0, batch_size=8, batches_per_epoch=1)


def test_load_pairs_reads_the_eval_split_in_order(shard_dir):
    pairs, labels, ids = load_pairs(shard_paths(shard_dir, "eval"))
    assert pairs.shape == (64, 2, 32, 32) and list(ids[:, 0]) == list(range(50_000, 50_064))
    assert list(labels) == [i % 2 for i in range(50_000, 50_064)]
    assert len(load_pairs(shard_paths(shard_dir, "eval"), limit=20)[0]) == 20


def test_fliprot_applies_one_transform_to_both_patches():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (64, 32, 32), dtype=torch.uint8, generator=g)
    pairs = torch.stack([a, a], 1)
    out = fliprot(pairs, g)
    assert torch.equal(out[:, 0], out[:, 1])  # the pair stays a pair
    kinds = set()
    for i in range(64):
        options = {"id": a[i], "t": a[i].T, "f": a[i].flip(-1), "tf": a[i].T.flip(-1)}
        kinds |= {k for k, v in options.items() if torch.equal(out[i, 0], v)}
    assert kinds == {"id", "t", "f", "tf"}


@pytest.mark.parametrize("shuffle_buffer", [8, 16, 500])
def test_shuffle_buffer_neither_loses_nor_repeats_pairs(shard_dir, shuffle_buffer):
    """Pairs pass through the buffer exactly once: a pass minus what is still buffered at the end,
    no duplicates, and in an order different from the shards'."""
    urls = shard_paths(shard_dir, "train")[:2]  # one rank reads both: 64 pairs per pass
    stream = TrainStream(urls, rank=0, world_size=1, epoch=0, batch_size=8, batches_per_epoch=6,
                         shuffle_buffer=shuffle_buffer, seed=0)
    ids = ids_of(stream)
    assert len(ids) == 48
    if shuffle_buffer + 48 <= 64:  # everything emitted and buffered still comes from the first pass
        assert len(set(ids)) == 48
    assert ids != sorted(ids)


def test_jitter_rotates_each_patch_slightly_and_keeps_the_batch_shape():
    assert make_jitter(0, 0) is None
    torch.manual_seed(0)
    x = torch.rand(16, 1, 32, 32)
    y = make_jitter(10, 0.1)(x)
    assert y.shape == x.shape and not torch.equal(x, y)
    # small transforms: each patch stays far closer to its own source than to another patch
    own = (y - x).flatten(1).norm(dim=1)
    other = (y - x.roll(1, 0)).flatten(1).norm(dim=1)
    assert (own < other).all()
