"""WebDataset shards of patch pairs: writing, manifest, verification, listing.

Layout (read by ``pipeline.data.stream`` and the eval code; keep it exact)::

    {out_dir}/{split}-{index:06d}.tar     split in {"train", "eval"}
    {out_dir}/manifest.json

Each tar sample is a BLOCK of K pairs, key ``{split}-{index:06d}-{block:05d}`` (block index within
the shard), with three ``np.save`` members: ``pairs.npy`` uint8 (K, 2, P, P), ``labels.npy`` uint8
(K,) (1 = same scene point), ``ids.npy`` int64 (K, 2) (global point ids, equal iff positive).
One pair per tar member would decode at only ~5-20k samples/s per core; blocks decode near memory
speed. The last block of a split may hold fewer than ``pairs_per_block`` pairs.

While a conversion runs, ``{out_dir}/manifest.partial.json`` records its progress (see
``write_split``); an interrupted conversion re-run with the same arguments rewrites only the
shards that are missing or differ, and ``manifest.json`` is always written last.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import logging
import os
import re
import sys
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
import webdataset as wds
from tqdm import tqdm

SCHEMA_VERSION = 1
SPLITS = ("train", "eval")
MANIFEST_NAME = "manifest.json"
MEMBERS = ("pairs.npy", "labels.npy", "ids.npy")
_REQUIRED_TOP = ("schema_version", "source", "patch_size", "pairs_per_block", "splits")
_REQUIRED_SPLIT = ("pairs", "positives", "shards")
_REQUIRED_SHARD = ("name", "pairs", "blocks", "sha256")

logger = logging.getLogger(__name__)


class ShardError(ValueError):
    """A shard or manifest is missing, malformed or does not match its checksum."""


class SourceError(ShardError):
    """Raw input of a conversion (PhotoTour, HPatches, image sequences) is missing or malformed.

    A ShardError subclass so that callers handling ShardError (the CLI) report it cleanly; the
    message always names the offending file (and line, for text files).
    """


@dataclass
class PairBlock:
    """K patch pairs stored together as one tar sample."""

    pairs: np.ndarray  # uint8 (K, 2, P, P)
    labels: np.ndarray  # uint8 (K,)
    ids: np.ndarray  # int64 (K, 2)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def validate(self, patch_size: int, where: str = "PairBlock") -> None:
        """Raise ShardError (prefixed with ``where``) unless dtypes/shapes match the shard format."""
        p, lab, ids = self.pairs, self.labels, self.ids
        if not (isinstance(p, np.ndarray) and p.dtype == np.uint8 and p.ndim == 4 and p.shape[1:] == (2, patch_size, patch_size)):
            raise ShardError(f"{where}: pairs must be uint8 (K, 2, {patch_size}, {patch_size}), "
                             f"got {getattr(p, 'dtype', type(p))} {getattr(p, 'shape', None)}")
        k = p.shape[0]
        if k == 0:
            raise ShardError(f"{where}: empty block (K=0), expected at least one pair")
        if not (isinstance(lab, np.ndarray) and lab.dtype == np.uint8 and lab.shape == (k,)):
            raise ShardError(f"{where}: labels must be uint8 ({k},), got {getattr(lab, 'dtype', type(lab))} "
                             f"{getattr(lab, 'shape', None)}")
        if not (isinstance(ids, np.ndarray) and ids.dtype == np.int64 and ids.shape == (k, 2)):
            raise ShardError(f"{where}: ids must be int64 ({k}, 2), got {getattr(ids, 'dtype', type(ids))} "
                             f"{getattr(ids, 'shape', None)}")
        if lab.max() > 1:
            raise ShardError(f"{where}: labels must be 0 or 1, got max {int(lab.max())}")
        # Losses and metrics rely on "same id <=> positive"; a block breaking it is a generator bug.
        if not np.array_equal(ids[:, 0] == ids[:, 1], lab == 1):
            bad = int(np.flatnonzero((ids[:, 0] == ids[:, 1]) != (lab == 1))[0])
            raise ShardError(f"{where}: pair {bad} has ids {ids[bad].tolist()} but label {int(lab[bad])} "
                             f"(expected ids equal iff label 1)")


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    # Always C order: the same values give the same bytes (and sha256) whatever the array's layout.
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def _fsync_replace(tmp: Path, final: Path) -> None:
    """Atomically publish ``tmp`` as ``final``: readers see the old file or the complete new one."""
    os.replace(tmp, final)
    try:  # make the rename durable; not possible on every platform/filesystem
        fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def _shard_bytes(split: str, index: int, blocks: list[PairBlock]) -> bytes:
    """The exact bytes of one shard (deterministic: same blocks -> same bytes -> same sha256)."""
    buf = io.BytesIO()
    # encoder=False: members are already npy bytes; mtime=0: no per-member PAX header
    # (a float mtime grows shards ~67%) and byte-identical shards across runs.
    writer = wds.TarWriter(buf, encoder=False, mtime=0)
    for b, block in enumerate(blocks):
        writer.write({
            "__key__": f"{split}-{index:06d}-{b:05d}",
            "pairs.npy": _npy_bytes(block.pairs),
            "labels.npy": _npy_bytes(block.labels),
            "ids.npy": _npy_bytes(block.ids),
        })
    writer.close()
    return buf.getvalue()


def _publish_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via ``path.tmp`` + fsync + os.replace (never a torn file)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _fsync_replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _shard_entry(name: str, blocks: list[PairBlock], digest: str) -> dict:
    return {"name": name, "pairs": sum(len(b) for b in blocks), "blocks": len(blocks), "sha256": digest}


def _same_file(path: Path, data: bytes, digest: str) -> bool:
    """True if ``path`` already holds exactly ``data`` (size first, then sha256)."""
    try:
        if path.stat().st_size != len(data):
            return False
        return shard_sha256(path) == digest
    except OSError:
        return False


# --- resumable conversions ------------------------------------------------------------------------
# While a split is written with ``params`` (the generator's parameters), ``manifest.partial.json``
# records, per split, those params and every shard completed so far (name, pairs, blocks, sha256,
# positives); it is replaced atomically after each shard and removed when write_manifest publishes
# the final manifest.json. A re-run skips a shard when the file on disk is byte-identical to what it
# would write (same size and sha256 as the freshly serialised shard), so an interrupted conversion
# restarted with the same arguments only writes the shards that are missing or damaged, and a
# finished one re-run with the same arguments rewrites nothing. The partial manifest says which
# conversion (params) the shards on disk came from and how far it got.

PARTIAL_MANIFEST_NAME = "manifest.partial.json"


def _write_json_atomic(path: Path, obj: dict) -> None:
    _publish_bytes(path, (json.dumps(obj, indent=2) + "\n").encode("utf-8"))


def load_partial_manifest(out_dir: str | os.PathLike) -> dict | None:
    """The partial manifest of an unfinished conversion in ``out_dir`` (None if absent/unreadable)."""
    path = Path(out_dir) / PARTIAL_MANIFEST_NAME
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as e:
        logger.warning("%s: unreadable partial manifest (%s); starting the split afresh", path, e)
        return None
    if not isinstance(m, dict) or not isinstance(m.get("splits"), dict):
        logger.warning("%s: not a partial manifest; starting the split afresh", path)
        return None
    return m


def _jsonable(params: dict) -> dict:
    """``params`` as it reads back from JSON (tuples -> lists, ...), so comparisons are exact."""
    return json.loads(json.dumps(params, sort_keys=True, default=str))


def write_split(out_dir: str | os.PathLike, split: str, blocks: Iterable[PairBlock], blocks_per_shard: int,
                progress: bool = True, *, params: dict | None = None, report: dict | None = None) -> dict:
    """Write ``blocks`` as ``{split}-{index:06d}.tar`` shards of ``blocks_per_shard`` blocks each.

    All blocks must share one patch size (taken from the first). Returns the split's manifest
    entry ``{"pairs", "positives", "shards": [{"name", "pairs", "blocks", "sha256"}]}``. Shards of
    this split left over from an earlier, larger write are removed so globs cannot pick them up.

    Resumable: a shard whose file already holds exactly the bytes it would get is not rewritten
    (its size and sha256 are compared with the freshly serialised shard), so re-running an
    interrupted conversion with the same arguments only writes the missing or damaged shards, and
    the result is byte-identical to an uninterrupted run. With ``params`` (JSON-serialisable
    generator parameters) progress is also recorded in ``manifest.partial.json`` after every shard
    (see above). ``report``, if given, is filled with ``{"written": [names], "skipped": [names]}``.
    """
    if split not in SPLITS:
        raise ShardError(f"{out_dir}: unknown split {split!r}, expected one of {SPLITS}")
    if blocks_per_shard < 1:
        raise ShardError(f"{out_dir}: blocks_per_shard must be >= 1, got {blocks_per_shard}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict] = []
    pending: list[PairBlock] = []
    positives = 0
    patch_size: int | None = None
    written: list[str] = []
    skipped: list[str] = []

    partial: dict | None = None
    recorded: dict[str, dict] = {}
    if params is not None:
        jparams = _jsonable(params)
        partial = load_partial_manifest(out) or {"schema_version": SCHEMA_VERSION, "splits": {}}
        previous = partial["splits"].get(split)
        if (isinstance(previous, dict) and previous.get("params") == jparams
                and previous.get("blocks_per_shard") == blocks_per_shard):
            recorded = {s["name"]: s for s in previous.get("shards", []) if isinstance(s, dict) and "name" in s}
            if recorded:
                logger.info("%s: resuming split %r: %d shard(s) recorded complete by an earlier run",
                            out, split, len(recorded))
        partial["splits"][split] = {"params": jparams, "blocks_per_shard": blocks_per_shard, "complete": False,
                                    "shards": []}

    def flush(bar: tqdm) -> None:
        nonlocal pending
        index = len(shards)
        name = _shard_name(split, index)
        data = _shard_bytes(split, index, pending)
        digest = hashlib.sha256(data).hexdigest()
        if _same_file(out / name, data, digest):
            skipped.append(name)
        else:
            _publish_bytes(out / name, data)
            written.append(name)
        entry = _shard_entry(name, pending, digest)
        shards.append(entry)
        if partial is not None:
            partial["splits"][split]["shards"].append(
                {**entry, "positives": sum(int(b.labels.sum()) for b in pending)})
            _write_json_atomic(out / PARTIAL_MANIFEST_NAME, partial)
        pending = []
        bar.set_postfix(written=len(written), skipped=len(skipped), refresh=False)

    with tqdm(desc=f"shards {split}", unit="pair", disable=not progress, file=sys.stderr) as bar:
        for block in blocks:
            if patch_size is None:
                patch_size = int(np.shape(block.pairs)[-1])
            name = _shard_name(split, len(shards))
            block.validate(patch_size, where=f"{out / name} block {len(pending)}")
            pending.append(block)
            positives += int(block.labels.sum())
            bar.update(len(block))
            if len(pending) == blocks_per_shard:
                flush(bar)
        if pending:
            flush(bar)
    if not shards:
        raise ShardError(f"{out}: no blocks given for split {split!r}, expected at least one")
    keep = {s["name"] for s in shards}
    pattern = re.compile(rf"^{split}-\d{{6}}\.tar(\.tmp)?$")
    for stale in out.iterdir():
        if pattern.match(stale.name) and stale.name not in keep:
            stale.unlink()
    if skipped:
        msg = (f"{out}: split {split!r}: {len(skipped)} of {len(shards)} shard(s) already complete "
               f"(identical sha256), skipped; {len(written)} written")
        logger.info(msg)
        if progress:
            tqdm.write(msg, file=sys.stderr)
    if partial is not None:
        partial["splits"][split]["complete"] = True
        _write_json_atomic(out / PARTIAL_MANIFEST_NAME, partial)
    if report is not None:
        report["written"], report["skipped"] = written, skipped
    return {"pairs": sum(s["pairs"] for s in shards), "positives": positives, "shards": shards}


def finish_conversion(out_dir: str | os.PathLike, *, source: str, patch_size: int, pairs_per_block: int,
                      generator: dict, splits: dict) -> dict:
    """The last step of every source: write the manifest describing the finished splits."""
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "source": source,
        "patch_size": patch_size,
        "pairs_per_block": pairs_per_block,
        "generator": generator,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "splits": splits,
    }
    write_manifest(out_dir, manifest)
    return manifest


def write_manifest(out_dir: str | os.PathLike, manifest: dict) -> Path:
    """Write ``manifest.json`` atomically (temp file + os.replace); fills ``created`` if absent.

    The conversion is then finished: its ``manifest.partial.json`` (if any) is removed.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = dict(manifest)
    manifest.setdefault("schema_version", SCHEMA_VERSION)
    manifest.setdefault("created", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    path = out / MANIFEST_NAME
    _write_json_atomic(path, manifest)
    (out / PARTIAL_MANIFEST_NAME).unlink(missing_ok=True)
    return path


# --- reading shard folders: local paths or URLs -----------------------------------------------------
# A manifest is data, not code: every shard name it lists must match SHARD_NAME, and a shard is
# opened as a file object (a local file, or fsspec for a URL), never handed to a shell or to an
# external program (webdataset's `pipe:` and curl openers are not used).

SHARD_NAME = re.compile(r"^(train|eval)-\d{6}\.tar$")
# The URL schemes shards may live under, and the optional package (and extra) fsspec needs for each.
REMOTE_SCHEMES: dict[str, tuple[str, str] | None] = {
    "http": None, "https": None, "s3": ("s3fs", "s3"), "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs")}


class ManifestNotFound(ShardError):
    """There is no manifest.json at the location (any other failure to read one is a plain ShardError)."""


def _manifest_path(shard_dir: str | os.PathLike) -> Path:
    p = Path(_local(shard_dir))
    return p if p.name == MANIFEST_NAME and not p.is_dir() else p / MANIFEST_NAME


def is_remote(location: str | os.PathLike) -> bool:
    """http(s)://, s3://, gs://, ... (anything but a local path or file://)."""
    return "://" in str(location) and not str(location).startswith("file://")


def _local(location: str | os.PathLike) -> str:
    """A local path, from a path or a file:// URL."""
    location = str(location)
    return location[len("file://"):] if location.startswith("file://") else location


def _remote_manifest_url(location: str) -> str:
    location = str(location).rstrip("/")
    return location if location.endswith(MANIFEST_NAME) else f"{location}/{MANIFEST_NAME}"


def _manifest_location(shard_dir: str | os.PathLike) -> str:
    return _remote_manifest_url(str(shard_dir)) if is_remote(shard_dir) else str(_manifest_path(shard_dir))


def open_remote(url: str) -> BinaryIO:
    """Open a remote file for reading through fsspec (http(s) built in; s3:// needs s3fs, gs:// gcsfs).

    http(s) is read front to back in one request (``block_size=0``): a plain web server need not
    support range requests, and shards, manifests and checksums are all read sequentially.
    """
    import fsspec

    scheme = str(url).split("://", 1)[0].lower()
    if scheme not in REMOTE_SCHEMES:
        raise ShardError(f"{url}: unsupported URL scheme {scheme!r}, expected a local path or one of "
                         f"{', '.join(s + '://' for s in REMOTE_SCHEMES)}")
    extra = REMOTE_SCHEMES[scheme]
    if extra is not None and importlib.util.find_spec(extra[0]) is None:
        raise ShardError(f"{url}: reading {scheme}:// needs the optional package {extra[0]}: "
                         f"pip install 'patchflow[{extra[1]}]'")
    options = {"block_size": 0} if scheme in ("http", "https") else {}
    return fsspec.open(url, "rb", **options).open()


def check_shard_url(url: str) -> str:
    """``url`` itself if its file name matches SHARD_NAME (``{train,eval}-NNNNNN.tar``), else ShardError."""
    name = str(url).rsplit("/", 1)[-1]
    if not SHARD_NAME.match(name):
        raise ShardError(f"{url}: shard file name {name!r} does not match {SHARD_NAME.pattern} "
                         f"(expected e.g. train-000000.tar)")
    return str(url)


def open_shard(url: str) -> BinaryIO:
    """A binary file object for one shard: a local path, file:// or an http(s)/s3/gs URL; the
    name is checked first, so a crafted name is refused before anything is opened."""
    check_shard_url(url)
    return open_remote(url) if is_remote(url) else open(_local(url), "rb")


def shard_sha256(location: str | os.PathLike) -> str:
    """sha256 of a local file or of a remote one, streamed (the one hashing loop of this module)."""
    h = hashlib.sha256()
    with open_remote(str(location)) if is_remote(location) else open(_local(location), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_manifest(shard_dir: str | os.PathLike) -> tuple[str, bytes]:
    """(where, raw bytes) of a shard folder's manifest.json, local or remote."""
    where = _manifest_location(shard_dir)
    try:
        if is_remote(shard_dir):
            with open_remote(where) as f:
                return where, f.read()
        return where, Path(where).read_bytes()
    except FileNotFoundError as e:
        if is_remote(shard_dir):
            raise ManifestNotFound(f"{where}: manifest could not be fetched ({type(e).__name__}: {e})") from None
        raise ManifestNotFound(f"{where}: manifest not found (expected a shard directory written by write_manifest)") from None
    except ShardError:
        raise
    except Exception as e:
        raise ShardError(f"{where}: manifest could not be fetched ({type(e).__name__}: {e})") from None


def manifest_sha256(shard_dir: str | os.PathLike) -> str:
    """sha256 of the manifest's bytes, local or remote (what a registered model records of its data)."""
    return hashlib.sha256(_read_manifest(shard_dir)[1]).hexdigest()


def load_manifest(shard_dir: str | os.PathLike) -> dict:
    """Read and check ``{shard_dir}/manifest.json`` (``shard_dir`` may also be the file itself, or a URL)."""
    path, data = _read_manifest(shard_dir)
    try:
        m = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(m, dict):
        raise ShardError(f"{path}: expected a JSON object, got {type(m).__name__}")
    if m.get("schema_version") != SCHEMA_VERSION:
        raise ShardError(f"{path}: schema_version {m.get('schema_version')!r}, expected {SCHEMA_VERSION}")
    missing = [k for k in _REQUIRED_TOP if k not in m]
    if missing:
        raise ShardError(f"{path}: missing keys {missing}, expected {list(_REQUIRED_TOP)}")
    if not isinstance(m["splits"], dict):
        raise ShardError(f"{path}: 'splits' must be an object keyed by split name")
    for split, entry in m["splits"].items():
        missing = [k for k in _REQUIRED_SPLIT if not isinstance(entry, dict) or k not in entry]
        if missing:
            raise ShardError(f"{path}: split {split!r} is missing keys {missing}, expected {list(_REQUIRED_SPLIT)}")
        for i, shard in enumerate(entry["shards"]):
            missing = [k for k in _REQUIRED_SHARD if not isinstance(shard, dict) or k not in shard]
            if missing:
                raise ShardError(f"{path}: split {split!r} shard {i} is missing keys {missing}, "
                                 f"expected {list(_REQUIRED_SHARD)}")
            # names become paths and URLs: nothing but the writer's own names is accepted
            name = shard["name"]
            if not (isinstance(name, str) and SHARD_NAME.match(name) and name.startswith(f"{split}-")):
                raise ShardError(f"{path}: split {split!r} shard {i} has name {name!r}, expected "
                                 f"'{split}-NNNNNN.tar' (six digits; pattern {SHARD_NAME.pattern})")
    return m


def manifest_beside(url: str) -> dict | None:
    """The manifest of the folder holding shard ``url`` (None when that folder has none)."""
    folder = str(url).rsplit("/", 1)[0] if is_remote(url) else Path(_local(url)).parent
    try:
        return load_manifest(folder)
    except ManifestNotFound:
        return None


def shard_paths(shard_dir: str | os.PathLike, split: str) -> list[str]:
    """Absolute paths (or URLs, for a remote shard folder) of ``split``'s shards in manifest
    order; local ones must exist."""
    m = load_manifest(shard_dir)
    where = _manifest_location(shard_dir)
    entry = m["splits"].get(split)
    if not entry or not entry["shards"]:
        raise ShardError(f"{where}: split {split!r} is absent or has no shards (present: {sorted(m['splits'])})")
    if is_remote(shard_dir):
        return [f"{where.rsplit('/', 1)[0]}/{shard['name']}" for shard in entry["shards"]]
    path = Path(where)
    out = []
    for shard in entry["shards"]:
        p = (path.parent / shard["name"]).resolve()
        if not p.is_file():
            raise ShardError(f"{p}: shard listed in {path} for split {split!r} is missing")
        out.append(str(p))
    return out


# --- checksums ----------------------------------------------------------------------------------------

SKIP_HINT = " (set data.on_bad_checksum: skip to leave it out)"  # for the readers a config drives

def iter_verified(paths: Iterable[str], expected: dict[str, str], *, on_bad: Literal["error", "skip"] = "error",
                  hint: str = SKIP_HINT) -> Iterator[str]:
    """Yield each of ``paths`` whose sha256 equals ``expected[its file name]`` (the manifest's).

    A mismatch raises ShardError (its message ends with ``hint``), or with ``on_bad="skip"`` is
    warned about and left out. Lazy: a caller that stops early does not hash the rest.
    """
    for path in paths:
        name = str(path).rsplit("/", 1)[-1]
        if name not in expected:
            raise ShardError(f"{path}: not listed in the manifest (it lists {sorted(expected)[:3]}...)")
        actual = shard_sha256(path)
        if actual == expected[name]:
            yield path
            continue
        problem = f"{path}: sha256 {actual} does not match the manifest's {expected[name]}"
        if on_bad == "error":
            raise ShardError(problem + hint)
        logger.warning("%s: shard left out", problem)


def checksums(manifest: dict, split: str) -> dict[str, str]:
    """The manifest's sha256 of each of ``split``'s shards, by name."""
    return {sh["name"]: sh["sha256"] for sh in manifest["splits"].get(split, {}).get("shards", [])}


def verify_checksums(shard_dir: str | os.PathLike, split: str, paths: list[str] | None = None, *,
                     on_bad: Literal["error", "skip"] = "error", hint: str = SKIP_HINT) -> list[str]:
    """``paths`` (default: every shard of ``split``) whose sha256 matches the manifest, in order;
    a mismatch raises or is left out (``on_bad``); none left raises."""
    expected = checksums(load_manifest(shard_dir), split)
    paths = shard_paths(shard_dir, split) if paths is None else paths
    good = list(iter_verified(paths, expected, on_bad=on_bad, hint=hint))
    if not good:
        raise ShardError(f"{shard_dir}: no usable {split} shard left after checksum verification")
    return good


def verify_shards(shard_dir: str | os.PathLike, split: str | None = None) -> None:
    """Recompute every listed shard's sha256 (one split or all); raise on the first mismatch."""
    for s in [split] if split is not None else list(load_manifest(shard_dir)["splits"]):
        verify_checksums(shard_dir, s, hint="")


def read_blocks(path: str | os.PathLike) -> Iterator[PairBlock]:
    """Yield the blocks of one shard in order (plain tarfile + np.load; for tests and small tools)."""
    def make(key: str, members: dict[str, bytes]) -> PairBlock:
        missing = [m for m in MEMBERS if m not in members]
        if missing:
            raise ShardError(f"{path}: sample {key!r} lacks members {missing}, expected {list(MEMBERS)}")
        arrays = {m: np.load(io.BytesIO(members[m]), allow_pickle=False) for m in MEMBERS}
        return PairBlock(arrays["pairs.npy"], arrays["labels.npy"], arrays["ids.npy"])

    key: str | None = None
    members: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                k, _, ext = info.name.partition(".")  # webdataset: key = name up to the first dot
                if k != key:
                    if key is not None:
                        yield make(key, members)
                    key, members = k, {}
                members[ext] = tar.extractfile(info).read()
    except tarfile.TarError as e:
        raise ShardError(f"{path}: not a readable tar shard ({e})") from None
    if key is not None:
        yield make(key, members)


# --- helpers shared by the sources ------------------------------------------------------------------

def block_sizes(n_pairs: int, pairs_per_block: int) -> list[int]:
    """Sizes of the blocks of a split of ``n_pairs``: full blocks, the last one possibly shorter."""
    if n_pairs < 1 or pairs_per_block < 1:
        raise ValueError(f"need n_pairs >= 1 and pairs_per_block >= 1, got {n_pairs}, {pairs_per_block}")
    full, rest = divmod(n_pairs, pairs_per_block)
    return [pairs_per_block] * full + ([rest] if rest else [])


def iter_blocks(pairs: np.ndarray, labels: np.ndarray, ids: np.ndarray, pairs_per_block: int) -> Iterator[PairBlock]:
    """Cut whole-split arrays into PairBlocks of ``pairs_per_block`` (views, no copies)."""
    for i in range(0, len(labels), pairs_per_block):
        yield PairBlock(pairs[i : i + pairs_per_block], labels[i : i + pairs_per_block], ids[i : i + pairs_per_block])


def distinct_per_block(rng: np.random.Generator, n_candidates: int, n_pairs: int, pairs_per_block: int,
                       what: str = "points") -> Iterator[np.ndarray]:
    """For each block of a split of ``n_pairs``, indices of distinct candidates (one per pair).

    The training-pair rule of HardNet's data generation: a scene point appears at most once per
    block (batch), so every other pair of the block is a true negative for hardest-in-batch mining.
    """
    sizes = block_sizes(n_pairs, pairs_per_block)
    if sizes[0] > n_candidates:
        raise ValueError(f"pairs_per_block={pairs_per_block} needs at least that many distinct {what} per block, "
                         f"but only {n_candidates} are available; lower pairs_per_block")
    for k in sizes:
        yield rng.choice(n_candidates, size=k, replace=False)
