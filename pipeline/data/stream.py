"""Per-rank streaming of patch-pair shards, written as a list of WebDataset stages.

Equal batches per rank, spelled out (a rank that runs out first hangs DDP's all-reduce):

    rank r of R reads the shards  urls[r::R]          (disjoint; together they cover the split)
    its pass over them repeats, reshuffled per pass   (so a rank never runs dry)
    loader worker w of W reads every W-th shard of that cycle
    and yields  batches_per_epoch // W  (+1 for w < batches_per_epoch % W)  batches
    => every rank yields exactly batches_per_epoch batches of batch_size pairs per epoch.

Shard order and the pair shuffle are seeded by (seed, epoch, rank, worker), so an epoch is
reproducible and a run restarted at epoch e reads what it would have read.
Pairs stay uint8 until after batching; ``DevicePlan.prepare_batch`` converts on the device.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterable
from typing import Iterator, Literal

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from pipeline.data.shards import (PairBlock, ShardError, check_shard_url, checksums, iter_verified, load_manifest,
                                  manifest_beside, open_shard, shard_paths)


log = logging.getLogger(__name__)


class StreamError(ValueError):
    """The shards cannot feed the requested ranks / workers."""


class SkipCounter:
    """WebDataset error handler that skips a bad sample or truncated tar, counts it and warns
    once per shard (webdataset's ``warn_and_continue`` warns every time and sleeps)."""

    def __init__(self) -> None:
        self.count = 0
        self._warned: set[str] = set()

    def __call__(self, exn: BaseException) -> bool:
        self.count += 1
        shard = next((str(a) for a in reversed(getattr(exn, "args", ())) if isinstance(a, str) and ".tar" in a), "?")
        if shard not in self._warned:
            self._warned.add(shard)
            log.warning("skipping bad data in shard %s (further problems in this shard are counted, not shown): %r", shard, exn)
        return True


def shards_for_rank(urls: list[str], rank: int, world_size: int) -> list[str]:
    return urls[rank::world_size]


def _open_shards(src: Iterable[dict], handler) -> Iterator[dict]:
    """webdataset's ``url_opener`` stage, opening through ``shards.open_shard`` (a file object:
    local file or fsspec) instead of webdataset's ``gopen``, whose ``pipe:`` and curl openers run
    external programs; each shard is closed once the tar reader is done with it."""
    for sample in src:
        url = sample["url"]
        try:
            stream = open_shard(url)
        except Exception as exn:
            exn.args = exn.args + (url,)
            if handler(exn):
                continue
            break
        try:
            yield {**sample, "stream": stream}
        finally:
            stream.close()


def tar_samples(src: Iterable[dict], handler) -> Iterator[dict]:
    """``{"url": ...}`` items -> tar samples (webdataset's ``tarfile_to_samples`` over ``_open_shards``)."""
    return group_by_keys(tar_file_expander(_open_shards(src, handler), handler=handler), handler=handler)


def _name(url: str) -> str:
    return url.rsplit("/", 1)[-1]


def _patch_size(urls: list[str], patch_size: int | None) -> int | None:
    """The patch size samples must have: given, else the manifest's beside the shards (None when
    there is none: the first readable sample then sets it)."""
    if patch_size is not None or not urls:
        return patch_size
    manifest = manifest_beside(urls[0])
    return None if manifest is None else int(manifest["patch_size"])


def check_shard_count(n_shards: int, world_size: int, loader_workers: int, split: str = "train") -> None:
    readers = world_size * max(1, loader_workers)
    if n_shards < readers:
        raise StreamError(
            f"{split} split has {n_shards} shard(s) but {world_size} rank(s) x {max(1, loader_workers)} "
            f"loader worker(s) = {readers} readers need at least one each; write more, smaller shards "
            f"(patchflow shards ... --blocks-per-shard) or lower scaling.num_workers / data.loader_workers"
        )


class _ShardCycle(IterableDataset):
    """Yields {"url": ...} over this rank's shards forever, reshuffled on every pass. A pass that
    decoded nothing (every shard this reader got is bad) raises instead of spinning forever."""

    def __init__(self, urls: list[str], seed: tuple[int, ...], progress: dict) -> None:
        self.urls, self.seed, self.progress = list(urls), seed, progress

    def __iter__(self) -> Iterator[dict]:
        rng = np.random.default_rng(self.seed)
        while True:
            blocks_before = self.progress["blocks"]
            for i in rng.permutation(len(self.urls)):
                yield {"url": self.urls[i]}
            if self.progress["blocks"] == blocks_before:
                raise StreamError(f"a full pass over {len(self.urls)} shard(s) ({self.urls[0]}, ...) yielded no readable sample")


_HEADER_CACHE: dict[bytes, tuple[np.dtype, tuple[int, ...]]] = {}


def _npy(data: bytes) -> np.ndarray:
    """.npy bytes -> array without a copy. ``np.load`` parses the header with ``ast`` and copies
    the payload every time; headers repeat (same dtype/shape per block), so parse each one once."""
    if data[:6] != b"\x93NUMPY" or data[6] != 1:  # not a v1.0 header: let numpy handle (or reject) it
        return np.load(io.BytesIO(data), allow_pickle=False)
    header_len = int.from_bytes(data[8:10], "little")
    header = data[10 : 10 + header_len]
    parsed = _HEADER_CACHE.get(header)
    if parsed is None:
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(io.BytesIO(data[8 : 10 + header_len]))
        if fortran or dtype.hasobject:
            raise ValueError("expected a C-ordered numeric .npy array")
        parsed = _HEADER_CACHE[header] = (dtype, shape)
    dtype, shape = parsed
    return np.frombuffer(data, dtype=dtype, count=int(np.prod(shape)), offset=10 + header_len).reshape(shape)


def _decode(sample: dict, patch_size: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pairs, labels, ids = _npy(sample["pairs.npy"]), _npy(sample["labels.npy"]), _npy(sample["ids.npy"])
    if patch_size is None:
        patch_size = int(pairs.shape[-1]) if pairs.ndim == 4 else -1
    # The manifest's schema (shards.PairBlock): uint8 (K,2,P,P) pairs of its patch size, uint8 labels
    # in {0,1}, int64 ids equal iff positive. A block that differs would break the batch (another P)
    # or the loss (another label or id meaning) far from here.
    PairBlock(pairs, labels, ids).validate(patch_size, where=f"{sample.get('__url__', '?')} sample {sample.get('__key__')!r}")
    return pairs, labels, ids


def decode_blocks(
    samples: Iterator[dict], on_error: SkipCounter | None = None, progress: dict | None = None,
    patch_size: int | None = None, with_url: bool = False,
) -> Iterator[tuple]:
    """Tar samples -> (pairs uint8 (K,2,P,P), labels uint8 (K,), ids int64 (K,2)) blocks (with the
    shard's url first when ``with_url``). A sample that is undecodable or differs from the schema
    (``patch_size``; None: the first good sample's) goes to ``on_error`` (skipped) or raises."""
    for sample in samples:
        try:
            block = _decode(sample, patch_size)
        except Exception as exn:
            if on_error is None:
                raise
            exn.args = exn.args + (str(sample.get("__url__", "?")),)
            on_error(exn)
            continue
        patch_size = int(block[0].shape[-1])
        if progress is not None:
            progress["blocks"] += 1
        yield (sample.get("__url__"), *block) if with_url else block


def _shuffled_batches(
    blocks: Iterator, batch_size: int, buffer_pairs: int, rng: np.random.Generator, skips: SkipCounter
) -> Iterator[dict]:
    """Pair-level shuffle buffer, vectorised per block: each incoming pair takes the slot of a
    random buffered pair, which goes out into the batch being filled. Every pair is copied twice
    (into the buffer, into its batch) whatever the buffer size. Each batch also carries how many
    samples were skipped since the previous one (this works across loader processes)."""
    buffer = buffer_ids = batch = batch_ids = None
    held = filled = reported = 0
    for pairs, _labels, ids in blocks:
        if buffer is None:
            buffer = np.empty((buffer_pairs, *pairs.shape[1:]), np.uint8)
            buffer_ids = np.empty((buffer_pairs, 2), np.int64)
        take = min(len(pairs), buffer_pairs - held)  # warm-up: fill the buffer first
        buffer[held : held + take], buffer_ids[held : held + take] = pairs[:take], ids[:take]
        held += take
        pairs, ids = pairs[take:], ids[take:]
        while len(pairs):
            if batch is None:
                batch = np.empty((batch_size, *pairs.shape[1:]), np.uint8)
                batch_ids = np.empty((batch_size, 2), np.int64)
            n = min(len(pairs), batch_size - filled)
            if 0 < n <= held:
                slots = rng.permutation(held)[:n]  # distinct slots: no pair is emitted twice or lost
                batch[filled : filled + n], batch_ids[filled : filled + n] = buffer[slots], buffer_ids[slots]
                buffer[slots], buffer_ids[slots] = pairs[:n], ids[:n]
            elif held:  # buffer smaller than the chunk: pass the chunk through in random order
                order = rng.permutation(n)
                batch[filled : filled + n], batch_ids[filled : filled + n] = pairs[:n][order], ids[:n][order]
            else:  # shuffle_buffer = 0: keep the stream's order
                batch[filled : filled + n], batch_ids[filled : filled + n] = pairs[:n], ids[:n]
            filled += n
            pairs, ids = pairs[n:], ids[n:]
            if filled == batch_size:
                skipped, reported = skips.count - reported, skips.count
                yield {"pairs": torch.from_numpy(batch), "ids": torch.from_numpy(batch_ids), "skipped": skipped}
                batch = batch_ids = None
                filled = 0


class TrainStream(IterableDataset):
    """One epoch of one rank's training batches: ``{"pairs": uint8 (B,2,P,P), "ids": int64 (B,2)}``."""

    def __init__(
        self,
        urls: list[str],
        *,
        rank: int,
        world_size: int,
        epoch: int,
        batch_size: int,
        batches_per_epoch: int,
        shuffle_buffer: int = 4096,
        seed: int = 0,
        patch_size: int | None = None,
    ) -> None:
        # every name is checked up front: a crafted one is refused before any shard is opened
        self.rank_urls = shards_for_rank([check_shard_url(u) for u in urls], rank, world_size)
        if not self.rank_urls:
            raise StreamError(f"rank {rank} of {world_size} got no train shards (only {len(urls)} exist)")
        self.patch_size = _patch_size(urls, patch_size)
        self.rank, self.epoch, self.seed = rank, epoch, seed
        self.batch_size, self.batches_per_epoch, self.shuffle_buffer = batch_size, batches_per_epoch, shuffle_buffer

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        n_batches = self.batches_per_epoch // n_workers + (worker < self.batches_per_epoch % n_workers)
        seed = (self.seed, self.epoch, self.rank, worker)
        skips, progress = SkipCounter(), {"blocks": 0}
        pipeline = wds.DataPipeline(
            _ShardCycle(self.rank_urls, seed, progress),
            wds.split_by_worker,
            lambda src: tar_samples(src, skips),
            lambda samples: decode_blocks(samples, skips, progress, self.patch_size),
            lambda blocks: _shuffled_batches(blocks, self.batch_size, self.shuffle_buffer, np.random.default_rng(seed), skips),
        )
        for i, batch in enumerate(pipeline):
            if i == n_batches:
                return
            yield batch


def train_loader(urls: list[str], *, loader_workers: int = 0, **stream_kwargs) -> DataLoader:
    """DataLoader over a ``TrainStream``: batching happens in the stream (batch_size=None)."""
    check_shard_count(len(urls), stream_kwargs["world_size"], loader_workers)
    stream = TrainStream(urls, **stream_kwargs)
    return DataLoader(stream, batch_size=None, num_workers=loader_workers, pin_memory=torch.cuda.is_available())


def _read(urls: list[str], limit: int | None, patch_size: int | None
          ) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], dict[str, int]]:
    """The pairs of ``urls`` in shard order (the first ``limit``), and how many each shard gave."""
    urls = [check_shard_url(u) for u in urls]  # a crafted name is refused before any shard is opened
    skips, expected = SkipCounter(), _patch_size(urls, patch_size)
    dataset = wds.DataPipeline(
        wds.SimpleShardList(urls),
        lambda src: tar_samples(src, skips),
        lambda samples: decode_blocks(samples, skips, patch_size=expected, with_url=True),
    )
    pairs, labels, ids, n = [], [], [], 0
    per_shard = dict.fromkeys(urls, 0)
    for url, p, l, i in dataset:
        pairs.append(p), labels.append(l), ids.append(i)
        per_shard[url] += len(p)
        n += len(p)
        if limit is not None and n >= limit:
            break
    if not pairs:
        raise StreamError(f"no pairs could be read from {len(urls)} shard(s), first: {urls[:1]}")
    out = np.concatenate(pairs), np.concatenate(labels), np.concatenate(ids)
    return (tuple(a[:limit] for a in out) if limit is not None else out), per_shard


def load_pairs(urls: list[str], limit: int | None = None, *, patch_size: int | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read a whole (eval) split in shard order: pairs uint8 (N,2,P,P), labels (N,), ids (N,2).

    Samples that differ from the schema (``patch_size``; default the manifest's beside the shards)
    or cannot be decoded are skipped and warned about once per shard."""
    return _read(urls, limit, patch_size)[0]


def load_eval_pairs(
    shards: str | os.PathLike,
    limit: int | None = None,
    *,
    urls: list[str] | None = None,
    verify: bool = True,
    on_bad_checksum: Literal["error", "skip"] = "error",
    on_short: Literal["error", "skip"] = "error",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The first ``limit`` (None: all) eval pairs of the shard folder ``shards`` (or of ``urls``,
    its eval shards already chosen, e.g. by ``train.preflight``), as ``load_pairs`` returns them.

    Every shard read is checksum-verified first (``verify``; a mismatch raises or, with
    ``on_bad_checksum="skip"``, leaves the shard out), and only the shards the cap reaches are read.
    A shard that gives fewer pairs than its manifest entry (truncated, or samples that had to be
    skipped) makes the eval set short: a ShardError naming it, or with ``on_short="skip"`` a
    warning and the pairs that could be read.
    """
    manifest = load_manifest(shards)
    urls = shard_paths(shards, "eval") if urls is None else list(urls)
    listed = {s["name"]: int(s["pairs"]) for s in manifest["splits"].get("eval", {}).get("shards", [])}
    for u in urls:
        if _name(check_shard_url(u)) not in listed:
            raise ShardError(f"{u}: not an eval shard listed in {shards}'s manifest")
    chosen, asked = [], 0
    good = iter_verified(urls, checksums(manifest, "eval"), on_bad=on_bad_checksum) if verify else iter(urls)
    for u in good:
        chosen.append(u)
        asked += listed[_name(u)]
        if limit is not None and asked >= limit:
            break
    if not chosen:
        raise ShardError(f"{shards}: no usable eval shard left after checksum verification")
    # every chosen shard is read to its end (then cut to the cap) so each one's count is exact
    out, per_shard = _read(chosen, None, int(manifest["patch_size"]))
    asked = asked if limit is None else min(limit, asked)
    short = [f"{u} gave {n} of {listed[_name(u)]} pairs" for u, n in per_shard.items() if n < listed[_name(u)]]
    if short:
        problem = (f"{shards}: short eval set: " + "; ".join(short)
                   + f" ({min(len(out[1]), asked)} of {asked} pairs asked)")
        if on_short == "error":
            raise ShardError(problem + " (set data.on_short_eval: skip to evaluate on the pairs that could be read)")
        log.warning("%s; evaluating on the pairs that could be read", problem)
    return tuple(a[:limit] for a in out) if limit is not None else out


def load_eval_split(data, urls: list[str] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``load_eval_pairs`` as ``data`` (a ``config.DataConfig``) configures it: ``shards``,
    ``eval_pairs``, ``verify_checksums``, ``on_bad_checksum``, ``on_short_eval``."""
    return load_eval_pairs(data.shards, data.eval_pairs, urls=urls, verify=data.verify_checksums,
                           on_bad_checksum=data.on_bad_checksum, on_short=data.on_short_eval)
