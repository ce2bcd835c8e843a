"""hpatches-benchmark's three tasks (Balntas et al. 2017; github.com/hpatches/hpatches-benchmark,
``python/utils/tasks.py`` and ``results.py``) on an ``hpatches-release`` folder.

Tasks, each over the easy / hard / tough target images:

* **verification**: positive pairs (the same point in two images of a sequence), negatives from
  the same sequence (intra) and from any test sequence (inter). A pair row is ``s1, t1, idx1, s2,
  t2, idx2`` with image code ``t`` 0 = ``ref`` and 1..5 = the difficulty's image 1..5. The list is
  the negatives then the positives; "balanced" = ROC AUC over all of it, "imbalanced" = AP over
  the negatives and the first 20 % of the positives (the benchmark's figure). Both with the
  benchmark's own curves (stable sort, no tie grouping, trapezoid): ``_benchmark_auc``,
  ``pipeline.metrics.hpatches_verification_map``.
* **matching**: per sequence and target image, each ``ref`` patch matched to its nearest target
  patch; AP of those matches ranked by distance (``hpatches_matching_map``).
* **retrieval**: each query (a ``ref`` patch) against its 5 positives (the point in the
  difficulty's 5 images) followed by the distractors (``ref`` patches) of the other sequences, in
  file order, cut at pool sizes 100 .. 20000 (``hpatches_retrieval_map``).

Task definitions are the benchmark's csv files (``verif_pos_split-a.csv``, ``verif_neg_intra_…``,
``verif_neg_inter_…``, ``retr_queries_…``, ``retr_distractors_…``) where they are in the folder (or
its ``tasks/``, or ``tasks_dir``), used as given. Otherwise they are generated the way
``gen_verif`` / ``gen_retrieval`` generate them: numpy's legacy generator seeded with 42, the same
calls in the same order over the split's test list in ``splits.json`` order, so on the complete
release they are the benchmark's lists (the first queries of split a are v_birdwoman, v_strand,
i_salon, i_zion, as in its ``retr_queries_split-a.csv``). Two quirks are kept on purpose:
generated verification pairs draw image codes from 0..4 (``np.arange(5)``), never image 5, and
inter-sequence "negatives" may come from the same sequence. Generating the 1M verification pairs
takes about a minute (one legacy ``choice`` call per pair); ``HPatchesTasks.write`` keeps them.

Every patch of the test sequences (16 images) is described once per model; the summary is what
``hpatches_results.py`` prints (mean AP, in %), per-task detail beside it.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from torch import nn
from tqdm import tqdm

from pipeline.data.hpatches import (IMAGE_NAMES, OFFICIAL_SPLITS, load_sequence, load_splits_json, read_stack,
                                    release_dir, split_sequences)
from pipeline.data.shards import SourceError
from pipeline.device import DevicePlan
from pipeline.evaluate import describe
from pipeline.metrics import hpatches_matching_map, hpatches_retrieval_map, hpatches_verification_map
from pipeline.protocols.common import (is_pair_classifier, metric_key, on_device, row_distances, text_table,
                                       with_sift)

TASKS = ("verification", "matching", "retrieval")
DIFFICULTIES = {"e": "Easy", "h": "Hard", "t": "Tough"}
NEGATIVES = ("inter", "intra")
POOL_SIZES = (100, 500, 1000, 5000, 10000, 15000, 20000)  # eval_retrieval's at_ranks
TASK_SEED = 42  # gen_verif / gen_retrieval: np.random.seed(42)
VERIFICATION_PAIRS = 1_000_000
RETRIEVAL_QUERIES = 5_000
RETRIEVAL_DISTRACTORS = 20_000
MIN_PATCH_STD = 10.0  # gen_retrieval keeps queries / distractors whose ref patch has np.std > 10
IMBALANCED_POSITIVES = 0.2
VERIF_FILES = {"pos": "verif_pos_split-{}.csv", "neg_intra": "verif_neg_intra_split-{}.csv",
               "neg_inter": "verif_neg_inter_split-{}.csv"}
RETR_FILES = {"queries": "retr_queries_split-{}.csv", "distractors": "retr_distractors_split-{}.csv"}
_VERIF_HEADER = ["s1", "t1", "idx1", "s2", "t2", "idx2"]
_RETR_HEADER = ["s", "idx"]

# hpatches-benchmark splits.json: the test lists of "illum" and "view" in its order ("full" = illum + view).
# Generation draws sequences by position in this list, so the order decides which pairs come out.
BENCHMARK_ORDER: dict[str, tuple[str, ...]] = {
    "illum": (
        "i_crownnight", "i_table", "i_objects", "i_nescafe", "i_nijmegen", "i_whitebuilding", "i_porta",
        "i_santuario", "i_dc", "i_castle", "i_steps", "i_contruction", "i_melon", "i_yellowtent", "i_miniature",
        "i_troulos", "i_veggies", "i_zion", "i_gonnenberg", "i_autannes", "i_boutique", "i_fruits", "i_pool",
        "i_fog", "i_fenis", "i_village", "i_ajuntament", "i_partyfood", "i_kurhaus", "i_school", "i_chestnuts",
        "i_smurf", "i_indiana", "i_pinard", "i_lionnight", "i_kions", "i_ski", "i_greenhouse", "i_ktirio",
        "i_tools", "i_toy", "i_bridger", "i_lionday", "i_brooklyn", "i_crownday", "i_londonbridge", "i_greentea",
        "i_leuven", "i_nuts", "i_resort", "i_bologna", "i_duda", "i_dome", "i_pencils", "i_books", "i_parking",
        "i_salon"),
    "view": (
        "v_circus", "v_charing", "v_colors", "v_astronautis", "v_maskedman", "v_talent", "v_london",
        "v_underground", "v_coffeehouse", "v_calder", "v_grace", "v_yard", "v_dogman", "v_laptop", "v_eastsouth",
        "v_boat", "v_strand", "v_busstop", "v_artisans", "v_machines", "v_soldiers", "v_home", "v_wapping",
        "v_wounded", "v_weapons", "v_adam", "v_there", "v_vitro", "v_cartooncity", "v_abstract", "v_dirtywall",
        "v_beyus", "v_apprentices", "v_sunseason", "v_wall", "v_war", "v_bricks", "v_fest", "v_churchill",
        "v_blueprint", "v_tempera", "v_samples", "v_man", "v_bees", "v_pomegranate", "v_bip", "v_feast",
        "v_azzola", "v_woman", "v_yuri", "v_posters", "v_bird", "v_graffiti", "v_bark", "v_wormhole",
        "v_tabletop", "v_courses", "v_birdwoman", "v_gardens"),
}
BENCHMARK_ORDER["full"] = BENCHMARK_ORDER["illum"] + BENCHMARK_ORDER["view"]


def image_index(code: np.ndarray | int, difficulty: str) -> np.ndarray:
    """Benchmark image code (0 = ref, 1..5) -> index in ``IMAGE_NAMES`` for a difficulty (``id2t``)."""
    code = np.asarray(code)
    return np.where(code == 0, 0, 1 + 5 * "eht".index(difficulty) + code - 1)


def split_order(root: str | os.PathLike, split: str = "a", splits_json: str | os.PathLike | None = None) -> list[str]:
    """A split's test sequences in the order the benchmark draws from: ``splits_json``'s (or the
    official ``splits.json``'s) list; sequences the official lists do not name go last, sorted."""
    names = split_sequences(root, split, splits_json)["test"]
    table = load_splits_json(splits_json) if splits_json is not None else None
    if table is not None and split in table:
        ref: Sequence[str] = table[split]["test"]
    elif split in OFFICIAL_SPLITS:
        ref = OFFICIAL_SPLITS[split]
    else:
        ref = BENCHMARK_ORDER.get(split, ())
    present = set(names)
    head = list(dict.fromkeys(s for s in ref if s in present))
    return head + sorted(present - set(head))


@dataclass
class HPatchesTasks:
    """The task definitions of one split. Sequence fields are indices into ``sequences``."""

    split: str
    sequences: list[str]  # test sequences, benchmark order
    lengths: np.ndarray  # int64, patches per sequence
    verification: dict[str, np.ndarray] | None = None  # pos / neg_intra / neg_inter -> int64 (N, 6)
    queries: np.ndarray | None = None  # int64 (Q, 2): sequence, patch index
    distractors: np.ndarray | None = None  # int64 (M, 2)
    sources: dict[str, str] = field(default_factory=dict)  # task -> file folder or "generated ..."

    def write(self, folder: str | os.PathLike) -> list[Path]:
        """The definitions as the benchmark's csv files in ``folder`` (read back as given)."""
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        written = []
        names = np.asarray(self.sequences, dtype=object)
        tables = []
        if self.verification is not None:
            tables += [(VERIF_FILES[k], _VERIF_HEADER, self.verification[k]) for k in VERIF_FILES]
        if self.queries is not None:
            tables += [(RETR_FILES["queries"], _RETR_HEADER, self.queries),
                       (RETR_FILES["distractors"], _RETR_HEADER, self.distractors)]
        for pattern, header, rows in tables:
            path = out / pattern.format(self.split)
            cols = [names[rows[:, j]] if h.startswith("s") else rows[:, j] for j, h in enumerate(header)]
            with path.open("w", newline="") as f:
                w = csv.writer(f, lineterminator="\n")
                w.writerow(header)
                w.writerows(zip(*cols))
            written.append(path)
        return written


def _read_rows(path: Path, header: list[str], index: dict[str, int], lengths: np.ndarray) -> np.ndarray:
    """A task csv -> int64 rows, sequence names as indices; one error naming file:line per bad row."""
    with path.open(newline="") as f:
        reader = csv.reader(f)
        first = next(reader, None)
        if first is None or [h.strip() for h in first] != header:
            raise SourceError(f"{path}:1: expected the header {','.join(header)}, got {','.join(first or [])!r}")
        rows = []
        for line, row in enumerate(reader, start=2):
            if len(row) != len(header):
                raise SourceError(f"{path}:{line}: expected {len(header)} fields {','.join(header)}, got {row!r}")
            vals = []
            for h, v in zip(header, row):
                if h.startswith("s"):
                    if v not in index:
                        raise SourceError(f"{path}:{line}: sequence {v!r} is not a test sequence of this split "
                                          f"({len(index)} test sequences)")
                    vals.append(index[v])
                else:
                    try:
                        vals.append(int(v))
                    except ValueError:
                        raise SourceError(f"{path}:{line}: {h}={v!r} is not an integer") from None
            rows.append(vals)
    out = np.asarray(rows, np.int64).reshape(-1, len(header))
    if len(out) == 0:
        raise SourceError(f"{path}: no rows after the header")
    for j, h in enumerate(header):
        if h.startswith("idx"):
            seq = out[:, j - (2 if len(header) == 6 else 1)]
            bad = np.flatnonzero((out[:, j] < 0) | (out[:, j] >= lengths[seq]))
            if bad.size:
                i = bad[0]
                raise SourceError(f"{path}:{i + 2}: {h}={out[i, j]} out of range (the sequence has "
                                  f"{lengths[seq[i]]} patches)")
        if h.startswith("t"):
            bad = np.flatnonzero((out[:, j] < 0) | (out[:, j] > 5))
            if bad.size:
                raise SourceError(f"{path}:{bad[0] + 2}: {h}={out[bad[0], j]}, expected an image code 0..5 "
                                  f"(0 = ref, 1..5 = e/h/t 1..5)")
    return out


def _find(folders: list[Path], names: list[str]) -> Path | None:
    """The first folder holding all of ``names``; one holding only some of them is an error."""
    for d in folders:
        have = [(d / n).is_file() for n in names]
        if all(have):
            return d
        if any(have):
            missing = names[have.index(False)]
            raise SourceError(f"{d / missing}: not found, but {d} holds the other task files of this task "
                              f"({', '.join(n for n, h in zip(names, have) if h)})")
    return None


def generate_verification(lengths: np.ndarray, n_pairs: int = VERIFICATION_PAIRS, seed: int = TASK_SEED
                          ) -> dict[str, np.ndarray]:
    """``gen_verif``: the same legacy-generator calls in the same order, sequences as indices into
    the test list (``choice`` over names draws the same positions)."""
    rs = np.random.RandomState(seed)
    n = int(n_pairs)
    s = rs.choice(len(lengths), n)
    s_idx = np.array([rs.choice(k, 2, replace=False) for k in lengths[s]], np.int64).reshape(n, 2)
    s_type = np.array([rs.choice(5, 2, replace=False) for _ in range(n)], np.int64).reshape(n, 2)
    s_inter = rs.choice(len(lengths), n)
    idx_inter = np.array([rs.randint(k) for k in lengths[s_inter]], np.int64)
    t1, t2 = s_type[:, 0], s_type[:, 1]
    return {"pos": np.stack([s, t1, s_idx[:, 0], s, t2, s_idx[:, 0]], 1),
            "neg_intra": np.stack([s, t1, s_idx[:, 0], s, t2, s_idx[:, 1]], 1),
            "neg_inter": np.stack([s, t1, s_idx[:, 0], s_inter, t2, idx_inter], 1)}


def _first_unique(rows: np.ndarray) -> np.ndarray:
    """Rows without repeats, first occurrences in order (pandas ``drop_duplicates``)."""
    _, first = np.unique(rows, axis=0, return_index=True)
    return rows[np.sort(first)]


def generate_retrieval(lengths: np.ndarray, ref_std: Sequence[np.ndarray], n_queries: int = RETRIEVAL_QUERIES,
                       n_distractors: int = RETRIEVAL_DISTRACTORS, seed: int = TASK_SEED
                       ) -> tuple[np.ndarray, np.ndarray]:
    """``gen_retrieval``: 4x the queries and 10x the distractors drawn (sequence, then a patch of it),
    those whose ref patch has std <= 10 dropped, repeats dropped, the first ``n_queries`` kept, then
    distractors that are not queries, the first ``n_distractors`` kept. ``ref_std[s]``: np.std of
    each 65x65 ref patch of sequence s."""
    rs = np.random.RandomState(seed)
    s_q = rs.choice(len(lengths), int(n_queries * 4))
    q_idx = np.array([rs.randint(k) for k in lengths[s_q]], np.int64)
    s_d = rs.choice(len(lengths), int(n_distractors * 10))
    d_idx = np.array([rs.randint(k) for k in lengths[s_d]], np.int64)

    def textured(s: np.ndarray, idx: np.ndarray) -> np.ndarray:
        keep = np.array([ref_std[a][b] > MIN_PATCH_STD for a, b in zip(s, idx)], bool)
        return np.stack([s[keep], idx[keep]], 1).astype(np.int64).reshape(-1, 2)

    q = _first_unique(textured(s_q, q_idx))[: int(n_queries)]
    d = _first_unique(textured(s_d, d_idx))
    is_query = np.isin(d[:, 0] * (1 << 32) + d[:, 1], q[:, 0] * (1 << 32) + q[:, 1])
    return q, d[~is_query][: int(n_distractors)]


def hpatches_tasks(root: str | os.PathLike, split: str = "a", *, tasks: Sequence[str] = TASKS,
                   tasks_dir: str | os.PathLike | None = None, splits_json: str | os.PathLike | None = None,
                   verification_pairs: int = VERIFICATION_PAIRS, retrieval_queries: int = RETRIEVAL_QUERIES,
                   retrieval_distractors: int = RETRIEVAL_DISTRACTORS, seed: int = TASK_SEED,
                   progress: bool = False) -> HPatchesTasks:
    """The split's task definitions: the benchmark's csv files where present (``tasks_dir``, else
    ``root`` or ``root/tasks``), used as given; otherwise generated as the benchmark does."""
    bad = set(tasks) - set(TASKS)
    if bad:
        raise ValueError(f"unknown HPatches task(s) {sorted(bad)}; expected some of {list(TASKS)}")
    rel = release_dir(root)
    order = split_order(root, split, splits_json)
    if not order:
        raise SourceError(f"{rel}: HPatches split {split!r} has no test sequences")
    lengths, std = [], []  # patches per sequence; np.std of each 65x65 ref patch (gen_retrieval's filter)
    for seq in tqdm(order, desc="hpatches ref", unit="seq", disable=not progress):
        ref = read_stack(rel / seq / "ref.png")
        lengths.append(len(ref))
        std.append(ref.reshape(len(ref), -1).std(1))
    lengths = np.array(lengths, np.int64)
    out = HPatchesTasks(split, order, lengths)
    index = {s: i for i, s in enumerate(order)}
    folders = [Path(tasks_dir)] if tasks_dir is not None else [Path(root), Path(root) / "tasks"]
    if tasks_dir is not None and not Path(tasks_dir).is_dir():
        raise SourceError(f"{tasks_dir}: task folder not found")
    if "verification" in tasks:
        names = [p.format(split) for p in VERIF_FILES.values()]
        found = _find(folders, names)
        if found is not None:
            out.verification = {k: _read_rows(found / n, _VERIF_HEADER, index, lengths)
                                for k, n in zip(VERIF_FILES, names)}
            n_pos = len(out.verification["pos"])
            for k in ("neg_intra", "neg_inter"):
                if len(out.verification[k]) != n_pos:
                    raise SourceError(f"{found / VERIF_FILES[k].format(split)}: {len(out.verification[k])} pairs, but "
                                      f"{names[0]} has {n_pos} (the benchmark pairs negative i with positive i)")
            out.sources["verification"] = str(found)
        else:
            if (lengths < 2).any():
                short = order[int(np.argmax(lengths < 2))]
                raise SourceError(f"{rel / short / 'ref.png'}: a single patch; generated verification pairs need two "
                                  f"points per sequence")
            out.verification = generate_verification(lengths, verification_pairs, seed)
            out.sources["verification"] = f"generated (gen_verif, seed {seed}, {int(verification_pairs)} pairs)"
    if "retrieval" in tasks:
        names = [p.format(split) for p in RETR_FILES.values()]
        found = _find(folders, names)
        if found is not None:
            out.queries, out.distractors = (_read_rows(found / n, _RETR_HEADER, index, lengths) for n in names)
            out.sources["retrieval"] = str(found)
        else:
            out.queries, out.distractors = generate_retrieval(lengths, std, retrieval_queries, retrieval_distractors,
                                                              seed)
            out.sources["retrieval"] = (f"generated (gen_retrieval, seed {seed}, {len(out.queries)} queries, "
                                        f"{len(out.distractors)} distractors)")
            if len(out.queries) == 0:
                raise SourceError(f"{rel}: no ref patch of split {split!r} has std > {MIN_PATCH_STD}: no retrieval query")
    if "matching" in tasks:
        out.sources["matching"] = "every patch of every test sequence (no task file)"
    return out


# ---- evaluation -----------------------------------------------------------------------------------

def _benchmark_auc(distances: np.ndarray, labels: np.ndarray) -> float:
    """``metrics.roc(-d, labels)[2]``: stable sort by distance, TPR/FPR after every item, trapezoid."""
    d = np.asarray(distances, np.float64)
    y = np.asarray(labels).astype(bool)
    keep = d < np.inf
    y = y[keep][np.argsort(d[keep], kind="stable")]
    tp = np.r_[0, np.cumsum(y)] / max(int(labels.sum()), 1e-10)
    fp = np.r_[0, np.cumsum(~y)] / max(int((~np.asarray(labels).astype(bool)).sum()), 1e-10)
    return float(np.trapezoid(tp, fp))


def _describe_split(rel: Path, order: list[str], model: nn.Module, patch_size: int, plan: DevicePlan | None,
                    progress: bool, name: str) -> np.ndarray:
    """float32 (16, total patches, D): every patch of every image of the test sequences, once."""
    parts = []
    for seq in tqdm(order, desc=f"hpatches describe {name}", unit="seq", disable=not progress):
        p = load_sequence(rel / seq, IMAGE_NAMES, patch_size)  # (16, n, P, P)
        parts.append(describe(model, p.reshape(-1, *p.shape[2:]), plan).reshape(p.shape[0], p.shape[1], -1))
    return np.concatenate(parts, axis=1)


def _pair_distances(model: nn.Module, desc: np.ndarray, offsets: np.ndarray, rows: np.ndarray, difficulty: str,
                    chunk: int = 1 << 17) -> np.ndarray:
    out = np.empty(len(rows))
    for s in range(0, len(rows), chunk):
        r = rows[s : s + chunk]
        a = desc[image_index(r[:, 1], difficulty), offsets[r[:, 0]] + r[:, 2]]
        b = desc[image_index(r[:, 4], difficulty), offsets[r[:, 3]] + r[:, 5]]
        out[s : s + chunk] = row_distances(model, a, b)
    return out


def _verification(model: nn.Module, desc: np.ndarray, offsets: np.ndarray, tasks: HPatchesTasks) -> dict:
    out: dict[str, dict[str, dict[str, float]]] = {}
    v = tasks.verification
    for t in DIFFICULTIES:
        d_pos = _pair_distances(model, desc, offsets, v["pos"], t)
        n_pos = len(d_pos)
        n_imb = n_pos + int(n_pos * IMBALANCED_POSITIVES)
        out[t] = {}
        for neg in NEGATIVES:
            d = np.concatenate([_pair_distances(model, desc, offsets, v[f"neg_{neg}"], t), d_pos])
            labels = np.r_[np.zeros(len(d) - n_pos, np.uint8), np.ones(n_pos, np.uint8)]
            out[t][neg] = {"ap": hpatches_verification_map(d[:n_imb], labels[:n_imb]), "auc": _benchmark_auc(d, labels)}
    return out


def _matching(desc: np.ndarray, offsets: np.ndarray, tasks: HPatchesTasks) -> dict:
    out: dict[str, dict[str, list[float]]] = {}
    for s, seq in enumerate(tasks.sequences):
        sl = slice(offsets[s], offsets[s + 1])
        out[seq] = {t: [hpatches_matching_map(desc[0, sl], desc[int(image_index(i, t)), sl]) for i in range(1, 6)]
                    for t in DIFFICULTIES}
    return out


def _retrieval(desc: np.ndarray, offsets: np.ndarray, tasks: HPatchesTasks, pool_sizes: Sequence[int]) -> dict:
    q, dis = tasks.queries, tasks.distractors
    q_rows = offsets[q[:, 0]] + q[:, 1]
    pool_ref = desc[0, offsets[dis[:, 0]] + dis[:, 1]]
    out: dict[str, dict[int, float]] = {}
    for t in DIFFICULTIES:
        sums = dict.fromkeys(pool_sizes, 0.0)
        # Queries of one sequence share a pool: the distractors plus their own positives, which
        # carry the sequence's group so that each query sees only its own 5 (the benchmark drops
        # every distractor of the query's sequence).
        for g in np.unique(q[:, 0]):
            qi = np.flatnonzero(q[:, 0] == g)
            pos = np.stack([desc[int(image_index(i, t)), q_rows[qi]] for i in range(1, 6)], 1)  # (n, 5, D)
            pool = np.concatenate([pool_ref, pos.reshape(-1, pos.shape[-1])])
            groups = np.r_[dis[:, 0], np.full(5 * len(qi), g)]
            positives = len(dis) + np.arange(5 * len(qi)).reshape(len(qi), 5)
            for k in pool_sizes:
                sums[k] += len(qi) * hpatches_retrieval_map(desc[0, q_rows[qi]], pool, positives, np.full(len(qi), g),
                                                            groups, pool_size=k)
        out[t] = {k: sums[k] / len(q) for k in pool_sizes}
    return out


@dataclass
class HPatchesResult:
    """Per model: verification {difficulty: {inter/intra: {ap, auc}}}, matching {sequence:
    {difficulty: [AP of target image 1..5]}}, retrieval {difficulty: {pool size: mAP}}; all in [0, 1].
    ``summary`` / ``table`` give the benchmark's printed figures in %."""

    split: str
    sequences: list[str]
    sources: dict[str, str]
    counts: dict[str, int]
    pool_sizes: tuple[int, ...] = POOL_SIZES
    verification: dict[str, dict] = field(default_factory=dict)
    matching: dict[str, dict] = field(default_factory=dict)
    retrieval: dict[str, dict] = field(default_factory=dict)
    skipped: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def models(self) -> list[str]:
        return list(dict.fromkeys([*self.verification, *self.matching, *self.retrieval, *self.skipped]))

    def summary(self, model: str) -> dict[str, float]:
        """``hpatches_results.py``'s "Mean Average Precision" of each task, in %: verification = mean
        imbalanced AP over e/h/t x inter/intra; matching = mean over e/h/t of the mean AP over all
        (sequence, target image); retrieval = mean over pool sizes of the mean over e/h/t of the mAP."""
        out = {}
        if model in self.verification:
            v = self.verification[model]
            out["verification"] = 100 * float(np.mean([v[t][n]["ap"] for t in DIFFICULTIES for n in NEGATIVES]))
        if model in self.matching:
            out["matching"] = 100 * float(np.mean(list(self.matching_by_difficulty(model).values())))
        if model in self.retrieval:
            r = self.retrieval[model]
            out["retrieval"] = 100 * float(np.mean([np.mean([r[t][k] for t in DIFFICULTIES]) for k in self.pool_sizes]))
        return out

    def matching_by_difficulty(self, model: str) -> dict[str, float]:
        m = self.matching[model]
        return {t: float(np.mean([ap for seq in m for ap in m[seq][t]])) for t in DIFFICULTIES}

    def matching_by_type(self, model: str) -> dict[str, float]:
        """``results.py``'s bar-chart figure: per difficulty and sequence type (i_ / v_) the mean over
        sequences of their mean AP; "avg" = mean of the i and v means (each the mean over e/h/t)."""
        m = self.matching[model]
        out = {}
        for kind in ("i", "v"):
            seqs = [s for s in m if s.startswith(kind + "_")]
            for t in DIFFICULTIES:
                if seqs:
                    out[f"{t}_{kind}"] = float(np.mean([np.mean(m[s][t]) for s in seqs]))
            if seqs:
                out[f"avg_{kind}"] = float(np.mean([out[f"{t}_{kind}"] for t in DIFFICULTIES]))
        out["avg"] = float(np.mean([out[k] for k in ("avg_i", "avg_v") if k in out]))
        return out

    def table(self) -> str:
        rows = [["model", "verification", "matching", "retrieval"]]
        for name in self.models:
            s = self.summary(name)
            rows.append([name] + [f"{s[k]:.2f}" if k in s else "-" for k in TASKS])
        head = (f"HPatches split {self.split} ({len(self.sequences)} test sequences): mean average precision (%), "
                f"as hpatches_results.py prints it. Tasks: "
                + "; ".join(f"{k}: {v}" for k, v in self.sources.items()))
        lines = [text_table(rows, head)]
        for name, skipped in self.skipped.items():
            lines += [f"{name}: {task} skipped ({why})" for task, why in skipped.items()]
        return "\n".join(lines)

    def detail_table(self) -> str:
        """The per-task tables of ``hpatches_results.py`` (its ``more_info`` layout) per model, in %."""
        out = []
        for name in self.models:
            if name in self.verification:
                v = self.verification[name]
                rows = [["noise", "inter AP", "intra AP", "inter AUC (balanced)", "intra AUC (balanced)"]]
                rows += [[DIFFICULTIES[t]] + [f"{100 * v[t][n]['ap']:.2f}" for n in NEGATIVES]
                         + [f"{100 * v[t][n]['auc']:.2f}" for n in NEGATIVES] for t in DIFFICULTIES]
                out.append(text_table(rows, f"{name}: verification (imbalanced AP; balanced ROC AUC)"))
            if name in self.matching:
                m, by = self.matching_by_difficulty(name), self.matching_by_type(name)
                rows = [["", *DIFFICULTIES.values(), "mean"],
                        ["mAP", *(f"{100 * m[t]:.2f}" for t in DIFFICULTIES), f"{100 * np.mean(list(m.values())):.2f}"]]
                for kind in ("i", "v"):
                    if f"avg_{kind}" in by:
                        rows.append([f"{kind}_*", *(f"{100 * by[f'{t}_{kind}']:.2f}" for t in DIFFICULTIES),
                                     f"{100 * by[f'avg_{kind}']:.2f}"])
                out.append(text_table(rows, f"{name}: matching (mean AP over sequences x target images)"))
            if name in self.retrieval:
                r = self.retrieval[name]
                rows = [["noise", *map(str, self.pool_sizes)]]
                rows += [[DIFFICULTIES[t], *(f"{100 * r[t][k]:.2f}" for k in self.pool_sizes)] for t in DIFFICULTIES]
                rows.append(["mean", *(f"{100 * np.mean([r[t][k] for t in DIFFICULTIES]):.2f}" for k in self.pool_sizes)])
                out.append(text_table(rows, f"{name}: retrieval (mAP by pool size)"))
        return "\n\n".join(out)

    def metrics(self) -> dict[str, float]:
        """Flat, MLflow-safe: ``<model>/<task>/mAP`` (%) and the per-difficulty figures (in [0, 1])."""
        out = {}
        for name in self.models:
            for task, value in self.summary(name).items():
                out[metric_key(name, task, "mAP")] = value
            for t, per in self.verification.get(name, {}).items():
                for neg, vals in per.items():
                    out[metric_key(name, "verification", t, neg, "ap")] = vals["ap"]
                    out[metric_key(name, "verification", t, neg, "auc")] = vals["auc"]
            if name in self.matching:
                for t, v in self.matching_by_difficulty(name).items():
                    out[metric_key(name, "matching", t, "mAP")] = v
            for t, per in self.retrieval.get(name, {}).items():
                for k, v in per.items():
                    out[metric_key(name, "retrieval", t, f"pool{k}", "mAP")] = v
        return out

    def to_dict(self) -> dict:
        return {"protocol": "hpatches", "split": self.split, "sequences": self.sequences, "sources": self.sources,
                "counts": self.counts, "pool_sizes": list(self.pool_sizes),
                "models": {n: {"summary": self.summary(n), "verification": self.verification.get(n),
                               "matching": self.matching.get(n),
                               "matching_by_type": self.matching_by_type(n) if n in self.matching else None,
                               "retrieval": {t: {str(k): v for k, v in per.items()}
                                             for t, per in self.retrieval[n].items()} if n in self.retrieval else None,
                               "skipped": self.skipped.get(n, {})} for n in self.models}}


def evaluate_hpatches(root: str | os.PathLike, models: Mapping[str, nn.Module] | None, *, split: str = "a",
                      tasks: Sequence[str] = TASKS, definitions: HPatchesTasks | None = None, sift: bool = True,
                      patch_size: int = 32, tasks_dir: str | os.PathLike | None = None,
                      splits_json: str | os.PathLike | None = None, pool_sizes: Sequence[int] = POOL_SIZES,
                      plan: DevicePlan | None = None, progress: bool = False, **generate) -> HPatchesResult:
    """The benchmark's tasks for every model (kornia's SIFT first) on a split's test sequences.

    ``definitions``: task definitions from ``hpatches_tasks`` (default: read or generated now, with
    ``generate`` = its ``verification_pairs`` / ``retrieval_queries`` / ``retrieval_distractors`` /
    ``seed``). Patches are area-resized 65 -> ``patch_size`` (``pipeline.data.hpatches``). A pair
    classifier (MatchNet) takes part in verification only: matching and retrieval compare every
    patch with every other, which its metric network does not do at that scale (recorded in
    ``skipped``).
    """
    bad = set(tasks) - set(TASKS)
    if bad or not tasks:
        raise ValueError(f"tasks must be some of {list(TASKS)}, got {list(tasks)}")
    defs = definitions or hpatches_tasks(root, split, tasks=tasks, tasks_dir=tasks_dir, splits_json=splits_json,
                                         progress=progress, **generate)
    if ("verification" in tasks and defs.verification is None) or ("retrieval" in tasks and defs.queries is None):
        raise ValueError("the task definitions lack a task that was asked for; build them with the same tasks")
    rel = release_dir(root)
    offsets = np.r_[0, np.cumsum(defs.lengths)].astype(np.int64)
    counts = {"patches": int(offsets[-1]) * len(IMAGE_NAMES)}
    if "verification" in tasks:
        counts["verification_pairs"] = int(len(defs.verification["pos"]))
    if "retrieval" in tasks:
        counts |= {"queries": int(len(defs.queries)), "distractors": int(len(defs.distractors))}
    result = HPatchesResult(defs.split, defs.sequences, {k: v for k, v in defs.sources.items() if k in tasks}, counts,
                            tuple(pool_sizes))
    for name, model in with_sift(models, patch_size, sift).items():
        desc = _describe_split(rel, defs.sequences, on_device(model, plan), patch_size, plan, progress, name)
        if "verification" in tasks:
            result.verification[name] = _verification(model, desc, offsets, defs)
        for task in ("matching", "retrieval"):
            if task in tasks and is_pair_classifier(model):
                result.skipped.setdefault(name, {})[task] = "pair classifier: all-pairs distances not computed"
        if is_pair_classifier(model):
            continue
        if "matching" in tasks:
            result.matching[name] = _matching(desc, offsets, defs)
        if "retrieval" in tasks:
            result.retrieval[name] = _retrieval(desc, offsets, defs, pool_sizes)
        del desc
    return result


__all__ = ["BENCHMARK_ORDER", "HPatchesResult", "HPatchesTasks", "POOL_SIZES", "TASKS", "evaluate_hpatches",
           "generate_retrieval", "generate_verification", "hpatches_tasks", "image_index", "split_order"]
