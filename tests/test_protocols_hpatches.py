"""HPatches protocol on a small release in the real on-disk layout (``<seq>/{ref,e1..t5}.png``,
vertical stacks of 65x65 patches): task generation against a loop-by-loop reading of
hpatches-benchmark's ``gen_verif`` / ``gen_retrieval``, every mAP against brute force."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from pipeline.data.hpatches import IMAGE_NAMES, OFFICIAL_SEQUENCES, OFFICIAL_SPLITS
from pipeline.data.shards import SourceError
from pipeline.models import create_model
from pipeline.protocols import SIFT_NAME, evaluate_hpatches, hpatches_tasks
from pipeline.protocols.hpatches import BENCHMARK_ORDER, _benchmark_auc, split_order
from test_metrics import reference_pr_ap

SEQS = {"i_alpha": 12, "i_beta": 9, "v_gamma": 14, "v_delta": 10}
ORDER = ["v_gamma", "i_alpha", "v_delta", "i_beta"]  # the split's test list, deliberately not sorted
NOISE = {"e": 25.0, "h": 60.0, "t": 110.0}
FLAT = {("i_alpha", 3), ("v_gamma", 0), ("v_gamma", 7)}  # ref patches with std < 10: never queries
POOLS = (6, 9, 20, 1000)
GEN = dict(verification_pairs=300, retrieval_queries=12, retrieval_distractors=25)


class RawPatch(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    """truth[seq]: uint8 (16, n, 65, 65); targets are the ref patch plus noise growing e < h < t.
    Contrast and noise vary by patch, so nearest neighbours err sometimes (more often for t)."""
    root = tmp_path_factory.mktemp("hp")
    rng = np.random.default_rng(0)
    truth = {}
    for name, n in SEQS.items():
        ref = 128 + rng.uniform(20, 80, (n, 1, 1)) * rng.uniform(-1, 1, (n, 65, 65))
        for s, k in FLAT:
            if s == name:
                ref[k] = 128 + rng.normal(0, 3, (65, 65))
        stack = [ref]
        for img in IMAGE_NAMES[1:]:
            stack.append(ref + rng.normal(0, 1, ref.shape) * NOISE[img[0]] * rng.uniform(0.4, 1.6, (n, 1, 1)))
        truth[name] = np.clip(np.round(np.stack(stack)), 0, 255).astype(np.uint8)
        (root / "hpatches-release" / name).mkdir(parents=True)
        for i, img in enumerate(IMAGE_NAMES):
            Image.fromarray(truth[name][i].reshape(n * 65, 65), mode="L").save(root / "hpatches-release" / name / f"{img}.png")
    (root / "splits.json").write_text(json.dumps({"s": {"test": ORDER}}))
    return root, truth


# ---- hpatches-benchmark's generation, re-read as plain loops over the global legacy generator --------

def loop_gen_verif(names: list[str], lengths: dict[str, int], n: int) -> dict[str, list[tuple]]:
    np.random.seed(42)
    s = np.random.choice(names, n)
    idx = [np.random.choice(np.arange(lengths[x]), 2, replace=False) for x in s]
    types = [np.random.choice(np.arange(5), 2, replace=False) for _ in s]
    s_inter = np.random.choice(names, n)
    idx_inter = [np.random.randint(lengths[x]) for x in s_inter]
    pos, intra, inter = [], [], []
    for i in range(n):
        pos.append((s[i], types[i][0], idx[i][0], s[i], types[i][1], idx[i][0]))
        intra.append((s[i], types[i][0], idx[i][0], s[i], types[i][1], idx[i][1]))
        inter.append((s[i], types[i][0], idx[i][0], s_inter[i], types[i][1], idx_inter[i]))
    return {"pos": pos, "neg_intra": intra, "neg_inter": inter}


def loop_gen_retrieval(names, lengths, ref_std, n_q, n_d) -> tuple[list[tuple], list[tuple]]:
    np.random.seed(42)
    s_q = np.random.choice(names, n_q * 4)
    q_idx = [np.random.randint(lengths[x]) for x in s_q]
    s_d = np.random.choice(names, n_d * 10)
    d_idx = [np.random.randint(lengths[x]) for x in s_d]
    queries, distractors = [], []
    for x, i in zip(s_q, q_idx):
        if ref_std[x][i] > 10 and (x, i) not in queries:
            queries.append((x, i))
    queries = queries[:n_q]
    for x, i in zip(s_d, d_idx):
        if ref_std[x][i] > 10 and (x, i) not in distractors:
            distractors.append((x, i))
    distractors = [r for r in distractors if r not in queries][:n_d]
    return queries, distractors


def named(tasks, rows: np.ndarray) -> list[tuple]:
    return [tuple(tasks.sequences[v] if j in (0, 3) else int(v) for j, v in enumerate(r)) for r in rows]


def test_generation_follows_the_benchmark(release) -> None:
    root, truth = release
    tasks = hpatches_tasks(root, "s", splits_json=root / "splits.json", **GEN)
    assert tasks.sequences == ORDER and tasks.lengths.tolist() == [SEQS[s] for s in ORDER]
    want = loop_gen_verif(ORDER, SEQS, GEN["verification_pairs"])
    for k in ("pos", "neg_intra", "neg_inter"):
        assert named(tasks, tasks.verification[k]) == [tuple(x if isinstance(x, str) else int(x) for x in r)
                                                        for r in want[k]]
    std = {s: truth[s][0].reshape(SEQS[s], -1).std(1) for s in SEQS}
    q, d = loop_gen_retrieval(ORDER, SEQS, std, GEN["retrieval_queries"], GEN["retrieval_distractors"])
    assert [(tasks.sequences[a], int(b)) for a, b in tasks.queries] == [(str(a), int(b)) for a, b in q]
    assert [(tasks.sequences[a], int(b)) for a, b in tasks.distractors] == [(str(a), int(b)) for a, b in d]
    assert len(q) == GEN["retrieval_queries"] and not FLAT & set(q) | FLAT & set(d)
    assert "generated (gen_verif, seed 42, 300 pairs)" == tasks.sources["verification"]


def test_official_split_order_reproduces_the_shipped_task_files(tmp_path: Path) -> None:
    # hpatches-benchmark's tasks/retr_queries_split-a.csv starts with these sequences, and its
    # verification examples (docs/tasks.md) with the first four: the same draws over split a's
    # test list in splits.json order.
    rel = tmp_path / "hpatches-release"
    rng = np.random.default_rng(1)
    for name in OFFICIAL_SPLITS["a"]:
        (rel / name).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (65 * 300, 65), dtype=np.uint8), mode="L").save(rel / name / "ref.png")
    tasks = hpatches_tasks(tmp_path, "a", verification_pairs=4, retrieval_queries=8, retrieval_distractors=5)
    assert tasks.sequences == OFFICIAL_SPLITS["a"]
    assert [tasks.sequences[s] for s in tasks.queries[:, 0]] == [
        "v_birdwoman", "v_strand", "i_salon", "i_zion", "v_courses", "v_birdwoman", "i_fog", "v_abstract"]
    assert [tasks.sequences[s] for s in tasks.verification["pos"][:, 0]] == ["v_birdwoman", "v_strand", "i_salon",
                                                                             "i_zion"]
    assert sorted(BENCHMARK_ORDER["full"]) == list(OFFICIAL_SEQUENCES)  # the copied order lists agree
    assert split_order(tmp_path, "illum") == [s for s in BENCHMARK_ORDER["illum"] if s in OFFICIAL_SPLITS["a"]]


# ---- brute force ------------------------------------------------------------------------------------

def descriptors(truth) -> dict[str, np.ndarray]:
    """seq -> float32 (16, n, 65*65): the raw patches in [0, 1], as the RawPatch model sees them."""
    return {s: (truth[s].astype(np.float32) / np.float32(255)).reshape(16, SEQS[s], -1) for s in truth}


def img(code: int, t: str) -> int:
    return 0 if code == 0 else IMAGE_NAMES.index(f"{t}{code}")


def dist(a, b) -> float:
    return float(np.sqrt(((a.astype(np.float64) - b.astype(np.float64)) ** 2).sum()))


def loop_auc(d, labels) -> float:
    """ROC area by the trapezoid over (FPR, TPR) after each item, stable order by distance."""
    order = sorted(range(len(d)), key=lambda i: d[i])
    p, n = sum(labels), len(labels) - sum(labels)
    tp = fp = 0
    area, prev = 0.0, (0.0, 0.0)
    for i in order:
        tp, fp = tp + labels[i], fp + (1 - labels[i])
        cur = (fp / n, tp / p)
        area += (cur[0] - prev[0]) * (cur[1] + prev[1]) / 2
        prev = cur
    return area


def brute_verification(desc, rows: dict[str, list[tuple]]) -> dict:
    out = {}
    for t in "eht":
        def d_of(r):
            return dist(desc[r[0]][img(r[1], t), r[2]], desc[r[3]][img(r[4], t), r[5]])

        d_pos = [d_of(r) for r in rows["pos"]]
        out[t] = {}
        for neg in ("inter", "intra"):
            d = [d_of(r) for r in rows[f"neg_{neg}"]] + d_pos
            labels = [0] * len(rows[f"neg_{neg}"]) + [1] * len(d_pos)
            n_imb = len(d_pos) + int(len(d_pos) * 0.2)
            out[t][neg] = {"ap": reference_pr_ap(-np.array(d[:n_imb]), labels[:n_imb]), "auc": loop_auc(d, labels)}
    return out


def brute_matching(desc) -> dict:
    out = {}
    for s in SEQS:
        out[s] = {}
        for t in "eht":
            aps = []
            for i in range(1, 6):
                ref, tgt = desc[s][0], desc[s][img(i, t)]
                nn, nd = [], []
                for a in ref:
                    ds = [dist(a, b) for b in tgt]
                    nn.append(int(np.argmin(ds)))
                    nd.append(min(ds))
                labels = [int(j == k) for k, j in enumerate(nn)]
                aps.append(reference_pr_ap(-np.array(nd), labels, numpos=len(ref)))
            out[s][t] = aps
    return out


def brute_retrieval(desc, queries, distractors, pools) -> dict:
    out = {}
    for t in "eht":
        sums = dict.fromkeys(pools, 0.0)
        for s, k in queries:
            q = desc[s][0, k]
            d = [dist(q, desc[s][img(i, t), k]) for i in range(1, 6)]
            d += [dist(q, desc[s2][0, k2]) for s2, k2 in distractors if s2 != s]
            gt = [1] * 5 + [0] * (len(d) - 5)
            for p in pools:
                sums[p] += reference_pr_ap(-np.array(d[:p]), gt[:p])
        out[t] = {p: sums[p] / len(queries) for p in pools}
    return out


def test_every_map_equals_brute_force(release) -> None:
    root, truth = release
    res = evaluate_hpatches(root, {"raw": RawPatch()}, split="s", splits_json=root / "splits.json", patch_size=65,
                            pool_sizes=POOLS, **GEN)
    tasks = hpatches_tasks(root, "s", splits_json=root / "splits.json", **GEN)
    desc = descriptors(truth)
    want_v = brute_verification(desc, {k: named(tasks, v) for k, v in tasks.verification.items()})
    want_m = brute_matching(desc)
    queries = [(tasks.sequences[a], int(b)) for a, b in tasks.queries]
    distractors = [(tasks.sequences[a], int(b)) for a, b in tasks.distractors]
    want_r = brute_retrieval(desc, queries, distractors, POOLS)
    for t in "eht":
        for neg in ("inter", "intra"):
            for k in ("ap", "auc"):
                assert res.verification["raw"][t][neg][k] == pytest.approx(want_v[t][neg][k], abs=1e-12)
        for s in SEQS:
            assert res.matching["raw"][s][t] == pytest.approx(want_m[s][t], abs=1e-12)
        for p in POOLS:
            assert res.retrieval["raw"][t][p] == pytest.approx(want_r[t][p], abs=1e-12)
    # not degenerate: noise grows e < h < t, so do the errors
    m = res.matching_by_difficulty("raw")
    assert 1 >= m["e"] > m["h"] > m["t"] > 0
    assert 0 < want_v["t"]["inter"]["ap"] < 1 and 0 < want_r["t"][1000] < 1

    # the printed summary: hpatches_results.py's means, in %
    s = res.summary("raw")
    assert s["verification"] == pytest.approx(100 * np.mean([want_v[t][n]["ap"] for t in "eht" for n in ("inter", "intra")]))
    assert s["matching"] == pytest.approx(100 * np.mean([np.mean([ap for q in SEQS for ap in want_m[q][t]]) for t in "eht"]))
    assert s["retrieval"] == pytest.approx(100 * np.mean([np.mean([want_r[t][p] for t in "eht"]) for p in POOLS]))
    by = res.matching_by_type("raw")  # results.py's bar chart: i_ and v_ means, then their mean
    assert by["avg"] == pytest.approx(np.mean([np.mean([np.mean(want_m[q][t]) for q in SEQS if q[0] == k])
                                               for k in "iv" for t in "eht"]))
    assert list(res.summary(SIFT_NAME)) == ["verification", "matching", "retrieval"]
    lines = res.table().splitlines()
    assert lines[1].split() == ["model", "verification", "matching", "retrieval"]
    assert lines[3].split()[0] == "sift"
    assert lines[4].split() == ["raw", *(f"{s[k]:.2f}" for k in ("verification", "matching", "retrieval"))]
    assert "Tough" in res.detail_table() and res.metrics()["raw/matching/mAP"] == s["matching"]
    json.dumps(res.to_dict())


def test_task_files_are_used_as_given(release, tmp_path: Path) -> None:
    root, truth = release
    folder = tmp_path / "tasks"
    folder.mkdir()
    v = [("i_beta", 0, 2, "i_beta", 5, 2), ("v_delta", 3, 9, "v_delta", 1, 9), ("v_gamma", 2, 13, "v_gamma", 4, 13)]
    intra = [("i_beta", 0, 2, "i_beta", 5, 7), ("v_delta", 3, 9, "v_delta", 1, 0), ("v_gamma", 2, 13, "v_gamma", 4, 1)]
    inter = [("i_beta", 0, 2, "v_gamma", 5, 3), ("v_delta", 3, 9, "i_alpha", 1, 11), ("v_gamma", 2, 13, "i_beta", 4, 8)]
    q = [("v_gamma", 5), ("i_alpha", 0)]
    d = [("i_beta", 1), ("v_gamma", 2), ("v_delta", 3), ("i_alpha", 4), ("i_beta", 6)]
    for name, header, rows in [("verif_pos_split-s.csv", "s1,t1,idx1,s2,t2,idx2", v),
                               ("verif_neg_intra_split-s.csv", "s1,t1,idx1,s2,t2,idx2", intra),
                               ("verif_neg_inter_split-s.csv", "s1,t1,idx1,s2,t2,idx2", inter),
                               ("retr_queries_split-s.csv", "s,idx", q), ("retr_distractors_split-s.csv", "s,idx", d)]:
        (folder / name).write_text(header + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
    kw = dict(split="s", splits_json=root / "splits.json", patch_size=65, pool_sizes=(6, 7, 50), sift=False)
    models = {"raw": RawPatch(), "matchnet": create_model("matchnet")}
    res = evaluate_hpatches(root, models, tasks_dir=folder, tasks=("verification", "retrieval"), **kw)
    assert res.sources == {"verification": str(folder), "retrieval": str(folder)} and "raw" not in res.matching
    # MatchNet's metric network scores the verification pairs; all-pairs retrieval is left out
    assert set(res.verification) == {"raw", "matchnet"} and set(res.retrieval) == {"raw"}
    assert "pair classifier" in res.skipped["matchnet"]["retrieval"] and "retrieval skipped" in res.table()
    desc = descriptors(truth)
    want_v = brute_verification(desc, {"pos": v, "neg_intra": intra, "neg_inter": inter})
    want_r = brute_retrieval(desc, q, d, (6, 7, 50))
    for t in "eht":
        for neg in ("inter", "intra"):
            assert res.verification["raw"][t][neg]["ap"] == pytest.approx(want_v[t][neg]["ap"], abs=1e-12)
        assert res.retrieval["raw"][t] == pytest.approx(want_r[t], abs=1e-12)

    # write() gives files that read back to the same definitions
    gen = hpatches_tasks(root, "s", splits_json=root / "splits.json", **GEN)
    gen.write(tmp_path / "written")
    back = hpatches_tasks(root, "s", splits_json=root / "splits.json", tasks_dir=tmp_path / "written")
    for k in gen.verification:
        np.testing.assert_array_equal(back.verification[k], gen.verification[k])
    np.testing.assert_array_equal(back.queries, gen.queries)
    np.testing.assert_array_equal(back.distractors, gen.distractors)
    with (tmp_path / "written" / "retr_queries_split-s.csv").open() as f:
        assert next(csv.reader(f)) == ["s", "idx"]

    # bad files: one error naming the file and line
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("verif_pos_split-s.csv", "verif_neg_intra_split-s.csv", "verif_neg_inter_split-s.csv"):
        (bad / name).write_text("s1,t1,idx1,s2,t2,idx2\ni_beta,0,2,i_beta,5,2\n")
    (bad / "verif_neg_inter_split-s.csv").write_text("s1,t1,idx1,s2,t2,idx2\ni_beta,0,2,i_beta,5,9\n")
    with pytest.raises(SourceError, match=r"verif_neg_inter_split-s.csv:2: idx2=9 out of range \(the sequence has 9"):
        hpatches_tasks(root, "s", splits_json=root / "splits.json", tasks=("verification",), tasks_dir=bad)
    (bad / "verif_neg_inter_split-s.csv").write_text("s1,t1,idx1,s2,t2,idx2\nv_nowhere,0,2,i_beta,5,1\n")
    with pytest.raises(SourceError, match=r"verif_neg_inter_split-s.csv:2: sequence 'v_nowhere' is not a test sequence"):
        hpatches_tasks(root, "s", splits_json=root / "splits.json", tasks=("verification",), tasks_dir=bad)
    (bad / "verif_neg_inter_split-s.csv").unlink()
    with pytest.raises(SourceError, match=r"verif_neg_inter_split-s.csv: not found, but .* holds the other task files"):
        hpatches_tasks(root, "s", splits_json=root / "splits.json", tasks=("verification",), tasks_dir=bad)


def test_benchmark_auc_keeps_list_order_on_ties() -> None:
    d = np.array([1.0, 2.0, 2.0, 3.0, 2.0, 0.5])
    labels = np.array([0, 1, 0, 1, 1, 0])
    assert _benchmark_auc(d, labels) == pytest.approx(loop_auc(d.tolist(), labels.tolist()))
    # tied items keep their list order (the benchmark lists negatives first): not sklearn's
    # tie-averaged AUC, which is 0.5 for the first two and 0.75 for the third
    assert _benchmark_auc(np.array([1.0, 1.0]), np.array([0, 1])) == 0.0
    assert _benchmark_auc(np.array([1.0, 1.0]), np.array([1, 0])) == 1.0
    assert _benchmark_auc(np.array([1.0, 1.0, 2.0]), np.array([0, 1, 0])) == pytest.approx(0.5)
