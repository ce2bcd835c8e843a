"""patchflow's evaluation wiring (pipeline.workflow.evaluate_on_*, the promotion gate on a benchmark,
benchmarks/quality.py's checks): what it returns and prints against what the MLflow run and the
registered versions hold, and against recomputations from the data. The protocols' own math is
tested in tests/test_protocols_*.py; here, small real fixtures keep the detection cheap and graf is
detected once (module-scoped)."""

from __future__ import annotations

import hashlib
import importlib.util
import re
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from PIL import Image
from torch import nn

from helpers import save_checkpoint
from test_protocols_hpatches import release  # noqa: F401  (a module-scoped fixture: a small release on disk)
from pipeline.config import Config, ConfigError, GateConfig, load_config, parse_gate
from pipeline.data.sequences import sequence_pairs
from pipeline.data.shards import shard_paths
from pipeline.data.stream import load_pairs
from pipeline.evaluate import PCA_FIT_PAIRS, PCA_FIT_SHARDS, describe, fit_descriptor_pca, pair_distances
from pipeline.metrics import average_precision, bootstrap_interval, fpr_at_95_recall
from pipeline.models import create_model
from pipeline.models.opencv import OPENCV_MODELS
from pipeline.models.sift import SIFT
from pipeline.pca import fit_learned_whitening, fit_pca
from pipeline.protocols import SIFT_NAME, evaluate_image_matching
from pipeline.registry import CHAMPION, load_descriptor, promote, register_checkpoint
from pipeline.tracking import get_or_create_experiment
from pipeline.workflow import evaluate_on_images, promote_registered, score_pair_sets

ROOT = Path(__file__).resolve().parents[1]
GRAF = ROOT / "data" / "oxford_graf"
CONSTRUCTIONS = ["dog-oriented", "harris-upright"]
KEYPOINTS = 150


def small_sequence(folder: Path) -> Path:
    """Oxford layout, small so that detection is quick: img1 = 256x256 of scikit-image's camera, img2 =
    it under a known homography (10 degrees about the centre, zoom 0.95, a little perspective)."""
    from kornia.geometry.transform import warp_perspective
    from skimage import data

    folder.mkdir(parents=True)
    photo = data.camera()[96:352, 128:384]
    Image.fromarray(photo).save(folder / "img1.png")
    a = np.deg2rad(10.0)
    centre = np.array([[1, 0, -128], [0, 1, -128], [0, 0, 1.0]])
    h = np.linalg.inv(centre) @ np.array([[0.95 * np.cos(a), -0.95 * np.sin(a), 3.0],
                                          [0.95 * np.sin(a), 0.95 * np.cos(a), -2.0], [1e-5, -2e-5, 1.0]]) @ centre
    warped = warp_perspective(torch.from_numpy(photo / 255.0).float()[None, None], torch.from_numpy(h).float()[None],
                              (256, 256), mode="bilinear", align_corners=True)[0, 0].numpy()
    Image.fromarray(np.clip(np.round(warped * 255), 0, 255).astype(np.uint8)).save(folder / "img2.png")
    (folder / "H1to2p").write_text("\n".join(" ".join(f"{v:.12e}" for v in row) for row in h) + "\n")
    return folder


def table_rows(text: str, header: str) -> dict[str, list[str]]:
    """The rows of the text table whose header row starts with ``header``: first cell -> other cells."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header + " "))
    rows = {}
    for line in lines[start + 2:]:
        if not line.strip() or line.startswith(("-", "*")):
            break
        cells = re.split(r"\s{2,}", line.strip())
        rows[cells[0]] = cells[1:]
    return rows


def sha256_of_folder(folder: Path) -> str:
    """The fingerprint's definition, written out: relative names then contents, sorted."""
    digest = hashlib.sha256()
    for p in sorted(q for q in folder.rglob("*") if q.is_file()):
        digest.update(str(p.relative_to(folder)).encode() + b"\0" + p.read_bytes())
    return digest.hexdigest()


def register(cfg: Config, model: nn.Module, folder: Path, pairs, labels) -> str:
    client = MlflowClient(cfg.mlflow.tracking_uri)
    run_id = client.create_run(get_or_create_experiment(client, "evaluation-test")).info.run_id
    return register_checkpoint(cfg, save_checkpoint(folder, model, cfg), run_id, eval_pairs=(pairs, labels)).version


@pytest.fixture(scope="module")
def sequence(tmp_path_factory) -> Path:
    return small_sequence(tmp_path_factory.mktemp("seq") / "camera")


@pytest.fixture(scope="module")
def images_run(sequence, synthetic_shards, tmp_path_factory):
    """One evaluation on the small sequence, logged to a SQLite store: kornia's SIFT, OpenCV's
    baselines, a registered version (by alias) and a checkpoint folder."""
    tmp = tmp_path_factory.mktemp("images-run")
    with pytest.MonkeyPatch.context() as mp:
        uri = f"sqlite:///{tmp / 'mlflow.db'}"
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        cfg = Config.model_validate({"data": {"shards": str(synthetic_shards)}, "model": {"arch": "l2net"},
                                     "mlflow": {"tracking_uri": uri, "registered_model": "eval-{arch}"}})
        pairs, labels, _ = load_pairs(shard_paths(synthetic_shards, "eval"), 64)
        torch.manual_seed(0)
        version = register(cfg, create_model("l2net").eval(), tmp / "registered", pairs, labels)
        ckpt = save_checkpoint(tmp / "ckpt", create_model("l2net").eval(), cfg)
        lines: list[str] = []
        report = evaluate_on_images(sequence, ["models:/eval-l2net@challenger", ckpt], constructions=CONSTRUCTIONS,
                                    n_pairs=80, max_keypoints=KEYPOINTS, experiment="eval-test", progress=lines.append)
        yield report, uri, version, ckpt, lines


def test_images_scores_equal_a_recomputation_from_the_pairs(images_run, sequence):
    report, _, version, ckpt, lines = images_run
    names = [m.name for m in report.models]
    assert names == [SIFT_NAME, *OPENCV_MODELS, f"models:/eval-l2net@challenger (v{version})", ckpt]
    assert [m.key for m in report.models] == ["sift", *OPENCV_MODELS, "model1", "model2"]
    assert lines == [f"[patchflow] camera: cutting {c} pairs" for c in CONSTRUCTIONS] + ["[patchflow] camera: image matching"]
    scores = report.results["fpr95"]
    assert list(scores.columns) == CONSTRUCTIONS
    for construction in CONSTRUCTIONS:
        pairs, labels, _ = sequence_pairs(sequence, n_pairs=80, max_keypoints=KEYPOINTS, construction=construction)
        assert scores.columns[construction] == (80, 40)
        for m in report.models:  # the plain path: every pair's two patches described, no sharing
            d = pair_distances(m.module, pairs)
            s = scores.scores[m.name][construction]
            assert s.fpr95 == pytest.approx(fpr_at_95_recall(d, labels), abs=1e-12), (m.name, construction)
            assert s.ap == pytest.approx(average_precision(d, labels), rel=1e-6)
            assert (s.fpr95_low, s.fpr95_high) == pytest.approx(bootstrap_interval(d, labels, fpr_at_95_recall), abs=1e-12)
        best = min(names, key=lambda n: scores.scores[n][construction].fpr95)
        assert scores.mark(best, construction) == "*"
    matching = report.results["matching"]
    assert list(matching.pairs) == names and matching.settings["max_keypoints"] == KEYPOINTS


def test_images_run_holds_what_was_printed(images_run, sequence, tmp_path):
    report, uri, version, _, _ = images_run
    client = MlflowClient(uri)
    run = client.get_run(report.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.tags["patchflow.protocol"] == "images"
    params = run.data.params
    assert params["protocol"] == "images" and params["data"] == str(sequence.resolve())
    assert params["data_sha256"] == report.data_sha256 == sha256_of_folder(sequence)
    assert params["split"] == ",".join(CONSTRUCTIONS) and params["models"] == ",".join(m.name for m in report.models)
    assert run.data.metrics == pytest.approx(report.metrics())
    assert run.data.tags["model1.version"] == f"eval-l2net v{version}" and run.data.tags["model2.name"] == report.models[-1].name

    # every printed row is the run's metrics, rounded as printed
    key = {m.name: m.key for m in report.models}
    printed = report.table()
    for name, cells in table_rows(printed, "descriptor").items():
        for construction, cell in zip(CONSTRUCTIONS, cells):
            m = {k: run.data.metrics[f"{key[name]}/{construction}/{k}"] for k in ("fpr95", "fpr95_low", "fpr95_high")}
            assert cell.rstrip("*~") == f"{m['fpr95']:.3f} [{m['fpr95_low']:.3f}, {m['fpr95_high']:.3f}]"
    matching_rows = table_rows(printed, "model")
    assert list(matching_rows) == list(key)
    for name, cells in matching_rows.items():
        mma = [run.data.metrics[f"{key[name]}/mma/{t}px"] for t in (1, 3, 5, 10)]
        assert cells[:5] == [f"{v:.3f}" for v in mma] + [f"{run.data.metrics[f'{key[name]}/matches']:.0f}"]

    artifacts = {a.path for a in client.list_artifacts(report.mlflow_run_id)}
    assert {"tables.txt", "fpr95.json", "matching.json", "plots"} <= artifacts
    assert {a.path for a in client.list_artifacts(report.mlflow_run_id, "plots")} == {"plots/mma.png",
                                                                                       "plots/fpr95_constructions.png"}
    logged = Path(client.download_artifacts(report.mlflow_run_id, "tables.txt", str(tmp_path))).read_text()
    assert logged == printed + "\n"

    # the registered version carries its figures, read back from the tables' own objects
    tags = client.get_model_version("eval-l2net", version).tags
    row = report.models[-2].name
    fpr = report.results["fpr95"].scores[row]["dog-oriented"].fpr95
    assert tags["eval/images/dog-oriented/fpr95"] == f"{fpr:.6g}"
    assert tags["eval/images/mma/3px"] == f"{report.results['matching'].mma(row)[2]:.6g}"
    assert tags["eval/images/run_id"] == report.mlflow_run_id and report.data_sha256 in tags["eval/images/data"]
    assert not any(k.endswith(("_low", "_high")) for k in tags)


class Counting(nn.Module):
    """kornia's SIFT, counting the patches it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.sift, self.seen = SIFT(32), 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen += len(x)
        return self.sift(x)


def test_each_distinct_patch_is_described_once_per_model():
    rng = np.random.default_rng(0)
    anchors = rng.integers(0, 256, (7, 32, 32), dtype=np.uint8)
    pairs = np.stack([anchors[rng.integers(0, 7, 60)], rng.integers(0, 256, (60, 32, 32), dtype=np.uint8)], 1)
    pairs[5, 1] = pairs[9, 1]  # a repeated second patch too
    labels = (np.arange(60) % 2).astype(np.uint8)
    models = {"counting": Counting(), "matchnet": create_model("matchnet").eval()}
    scores = score_pair_sets(models, {"a": (pairs, labels), "b": (pairs[:30], labels[:30])})
    distinct = len({p.tobytes() for p in pairs.reshape(-1, 32, 32)}) + len({p.tobytes() for p in pairs[:30].reshape(-1, 32, 32)})
    assert models["counting"].seen == distinct < 2 * (60 + 30)  # the plain path: both patches of every pair
    for name, model in models.items():  # MatchNet: its metric network compares the two, as on the plain path
        assert scores.scores[name]["a"].fpr95 == pytest.approx(fpr_at_95_recall(pair_distances(model, pairs), labels))


class Noise(nn.Module):
    """A descriptor that ignores the patch (seeded noise): its mutual nearest neighbours are chance
    matches, almost never within 3 px. (A constant descriptor would not do: its one tied match pairs
    the two strongest keypoints, which graf's near views often share.)"""

    def __init__(self) -> None:
        super().__init__()
        self.generator = torch.Generator().manual_seed(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.randn(len(x), 16, generator=self.generator)


@pytest.fixture(scope="module")
def graf_matching():
    return evaluate_image_matching(GRAF, {SIFT_NAME: SIFT(32), "noise": Noise()}, sift=False, max_keypoints=300)


def test_sift_matching_on_graf_is_sane_and_quality_checks_it(graf_matching, monkeypatch):
    """graf: 20..60 degrees of viewpoint. SIFT matches the near views and fails on the far ones, as in
    Mikolajczyk et al. 2005 (fig. 9a: SIFT's matching score on graf falls from ~0.6 at 20 degrees to
    ~0 at 60): its mean MMA at 3 px lies well inside (0, 1), and image 2 beats image 6."""
    mma3 = graf_matching.mma(SIFT_NAME)[2]
    assert 0.25 <= mma3 <= 0.55, mma3  # 0.375 at 300 keypoints, 0.39 at 2000 (2026-12)
    per_target = {p.target: p.accuracy([3.0])[0] for p in graf_matching.pairs[SIFT_NAME]}
    assert per_target[2] > 0.7 and per_target[6] < 0.2, per_target
    accuracy = [per_target[k] for k in sorted(per_target)]
    assert all(a >= b for a, b in zip(accuracy, accuracy[1:])), per_target  # falls with the angle
    assert graf_matching.homography_accuracy(SIFT_NAME)[10] >= 0.2  # at least img2's homography recovered

    spec = importlib.util.spec_from_file_location("quality", ROOT / "benchmarks" / "quality.py")
    quality = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "quality", quality)  # its dataclasses look their module up there
    spec.loader.exec_module(quality)
    assert quality.mma_check(graf_matching, SIFT_NAME).ok  # equal counts as "at least"
    bad = quality.mma_check(graf_matching, "noise")
    assert graf_matching.mma("noise")[2] < 0.05
    assert not bad.ok and bad.line().startswith("FAIL") and f"{mma3:.3f}" in bad.line()


def test_gate_config_and_its_text_form(tmp_path, monkeypatch):
    assert parse_gate("images:data/oxford_graf") == ("images:data/oxford_graf", None)
    assert parse_gate("images:data/oxford_graf:fpr95@harris-upright") == ("images:data/oxford_graf", "fpr95@harris-upright")
    assert parse_gate("hpatches:/d/hp:retrieval@b") == ("hpatches:/d/hp", "retrieval@b")
    assert parse_gate("phototour:/d/a:b") == ("phototour:/d/a:b", None)  # not a metric: part of the path
    assert GateConfig(data="images:x").ranking == ("mma@3px", False)
    assert GateConfig(data="images:x", metric="fpr95").ranking == ("fpr95@dog-oriented", True)
    assert GateConfig(data="hpatches:x").ranking == ("matching@a", False)
    assert GateConfig().ranking == ("fpr95", True)

    monkeypatch.chdir(tmp_path)
    path = tmp_path / "c.yaml"
    path.write_text("data: {shards: s}\nregistry: {gate: {data: 'images:graf', metric: homography@5px}}\n")
    assert load_config(path).registry.gate.data == f"images:{tmp_path / 'graf'}"  # resolved where it was loaded
    for gate, expected in ((("images:graf", "mma@0px"), "positive threshold"),
                           (("images:graf", "fpr95@dog-sideways"), "unknown pair construction"),
                           (("hpatches:hp", "matching@d"), "hpatches: expected"),
                           (("video:v", None), "expected 'eval' or one of")):
        path.write_text(f"data: {{shards: s}}\nregistry: {{gate: {{data: '{gate[0]}', metric: {gate[1] or 'null'}}}}}\n")
        with pytest.raises(ConfigError, match=rf"registry\.gate: .*{expected}"):
            load_config(path)


@pytest.fixture(scope="module")
def ubc(tmp_path_factory) -> Path:
    """Two UBC PhotoTour scenes in the raw layout (bmp tiles, info.txt, m50 files)."""
    from test_phototour import make_dataset, write_raw

    root = tmp_path_factory.mktemp("ubc")
    for seed, name in enumerate(["liberty", "notredame"]):
        write_raw(root / name, *make_dataset(seed))
    return root


def run_command(args: list[str], tmp_path: Path, monkeypatch, capsys) -> tuple[str, Run]:
    """``patchflow evaluate ...`` in ``tmp_path`` with the default local store: what it printed, its run."""
    from pipeline.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["evaluate", *args]) == 0
    out = capsys.readouterr().out
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("patchflow-evaluation").experiment_id])
    return out, run


def test_phototour_command_prints_what_it_logged(ubc, tmp_path, monkeypatch, capsys):
    from pipeline.cli import main

    out, run = run_command(["--phototour", str(ubc), "--split", "liberty", "--no-baselines", "--model", "opencv_sift"],
                           tmp_path, monkeypatch, capsys)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert run.data.params["split"] == "liberty" and run.data.params["data"] == str(ubc)
    assert run.data.params["data_sha256"] == sha256_of_folder(ubc / "liberty") and run.info.run_id in out
    rows = table_rows(out, "model")
    assert list(rows) == [SIFT_NAME, "opencv_sift"]
    for name, k in ((SIFT_NAME, "sift"), ("opencv_sift", "model1")):
        m = run.data.metrics
        assert rows[name][0] == (f"{100 * m[f'{k}/liberty/fpr95']:.2f} [{100 * m[f'{k}/liberty/fpr95_low']:.2f}, "
                                 f"{100 * m[f'{k}/liberty/fpr95_high']:.2f}]")
    assert {a.path for a in client.list_artifacts(run.info.run_id, "plots")} == {"plots/phototour_fpr95.png"}

    assert main(["evaluate", "--phototour", str(ubc), "--split", "yosemite", "--no-mlflow"]) == 2
    assert "yosemite: PhotoTour scene not found (scenes here: liberty, notredame)" in capsys.readouterr().err


def test_hpatches_command_prints_what_it_logged(release, tmp_path, monkeypatch, capsys):
    """Small task files in the release's tasks/ folder, used as given (the 1M generated verification
    pairs would take a minute)."""
    from pipeline.cli import main
    from pipeline.protocols import hpatches_tasks

    root, _ = release
    hpatches_tasks(root, "full", verification_pairs=300, retrieval_queries=12, retrieval_distractors=25).write(root / "tasks")
    out, run = run_command(["--hpatches", str(root), "--split", "full", "--no-baselines", "--model", "opencv_sift"],
                           tmp_path, monkeypatch, capsys)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    p, m = run.data.params, run.data.metrics
    assert (p["protocol"], p["split"], p["task_source.verification"]) == ("hpatches", "full", str(root / "tasks"))
    rows = table_rows(out, "model")
    assert list(rows) == [SIFT_NAME, "opencv_sift"]
    for name, k in ((SIFT_NAME, "sift"), ("opencv_sift", "model1")):
        assert rows[name] == [f"{m[f'{k}/{task}/mAP']:.2f}" for task in ("verification", "matching", "retrieval")]
    assert {a.path for a in client.list_artifacts(run.info.run_id, "plots")} == {
        f"plots/hpatches_{task}.png" for task in ("verification", "matching", "retrieval")}
    assert "hpatches_detail.txt" in {a.path for a in client.list_artifacts(run.info.run_id)}

    assert main(["evaluate", "--hpatches", str(root), "--split", "a", "--split", "b"]) == 2
    assert "--split: HPatches takes one split of a, b, c, illum, view, full, got a, b" in capsys.readouterr().err


def test_gate_decides_on_the_named_benchmark(mlflow_server, synthetic_shards, sequence, ubc, tmp_path, monkeypatch, capsys):
    """Against a real `mlflow server`: the challenger and the champion re-evaluated on the benchmark
    the gate names, the decision and both scores left on the challenger version."""
    from pipeline.cli import main
    from pipeline.protocols import evaluate_phototour
    from pipeline.workflow import _data_fingerprint

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    name = f"gate-{uuid.uuid4().hex[:8]}-hardnet"
    cfg = Config.model_validate({"data": {"shards": str(synthetic_shards)},
                                 "mlflow": {"tracking_uri": mlflow_server, "registered_model": name.replace("hardnet", "{arch}")}})
    pairs, labels, _ = load_pairs(shard_paths(synthetic_shards, "eval"), 128)
    torch.manual_seed(0)
    good, bad = create_model("hardnet").eval(), create_model("hardnet").eval()
    with torch.no_grad():
        for p in bad.parameters():
            p.zero_()  # every descriptor the same: at most one (tied) mutual match per pair, so no homography
    client = MlflowClient(mlflow_server)
    v1 = register(cfg, bad, tmp_path / "bad", pairs, labels)
    assert promote(name, pairs, labels).promoted  # the first champion
    v2 = register(cfg, good, tmp_path / "good", pairs, labels)

    # Ranked by homography accuracy: MMA would not do, the zeroed model's one tied match (the two
    # strongest keypoints) is often correct.
    gate = GateConfig(data=f"images:{sequence}", metric="homography@5px", max_keypoints=KEYPOINTS)
    promo = promote_registered(name, gate=gate)
    ref = evaluate_image_matching(sequence, {v: load_descriptor(f"models:/{name}/{v}") for v in (v1, v2)}, sift=False,
                                  max_keypoints=KEYPOINTS, homography_thresholds=[5.0])
    assert promo.metric == "homography@5px" and promo.gate == f"images:{sequence.resolve()}"
    assert promo.challenger_score == ref.homography_accuracy(v2)[5.0] == 1.0  # one image pair, a small warp
    assert promo.champion_score == ref.homography_accuracy(v1)[5.0] == 0.0
    assert promo.promoted
    tags = client.get_model_version(name, v2).tags
    assert tags["promotion/gate"] == promo.gate and tags["promotion/metric"] == "homography@5px"
    assert float(tags["promotion/challenger_score"]) == pytest.approx(promo.challenger_score, abs=1e-6)
    assert float(tags["promotion/champion_score"]) == pytest.approx(promo.champion_score, abs=1e-6)
    assert tags["promotion/champion_version"] == v1 and tags["promotion/decision"] == "promoted"
    assert tags["promotion/data_sha256"] == _data_fingerprint([sequence])[0] == sha256_of_folder(sequence)
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == v2

    # From the command: a PhotoTour gate, lower FPR95 wins; bad (v3) challenges good (v2) and loses.
    v3 = register(cfg, bad, tmp_path / "bad-again", pairs, labels)
    assert main(["promote", "--model", name, "--gate", f"phototour:{ubc}:fpr95@liberty"]) == 0
    out = capsys.readouterr().out
    ref = evaluate_phototour({"liberty": ubc / "liberty"}, {v: load_descriptor(f"models:/{name}/{v}") for v in (v2, v3)},
                             sift=False)
    tags = client.get_model_version(name, v3).tags
    assert tags["promotion/metric"] == "fpr95@liberty" and tags["promotion/gate"] == f"phototour:{ubc}"
    assert float(tags["promotion/challenger_score"]) == pytest.approx(ref.mean(v3), abs=1e-6) == 1.0  # all tied
    assert float(tags["promotion/champion_score"]) == pytest.approx(ref.mean(v2), abs=1e-6)
    assert tags["promotion/decision"] == f"kept v{v2}" and f"on phototour:{ubc} -> champion keeps v{v2}" in out
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == v2

    assert main(["promote", "--model", name, "--gate", f"images:{tmp_path / 'nowhere'}"]) == 2
    assert "nowhere not found (a metric goes last: images:DIR:METRIC)" in capsys.readouterr().err


def test_the_head_is_fitted_on_the_training_pairs_as_loaded(synthetic_shards):
    """fit_descriptor_pca against the fits run by hand on the same shards: the first PCA_FIT_PAIRS pairs
    as load_pairs gives them, each view described, learned whitening on the positives' own two views
    (a view paired with another pair's would whiten the wrong differences)."""
    torch.manual_seed(0)
    model = create_model("hardnet").eval()  # untrained: what is checked is which descriptors the fit sees
    urls = shard_paths(synthetic_shards, "train")
    pairs, labels, _ = load_pairs(urls[:PCA_FIT_SHARDS], PCA_FIT_PAIRS)
    a, b = describe(model, pairs[:, 0]), describe(model, pairs[:, 1])
    positive = labels == 1
    assert positive.sum() > 32  # synthetic training shards hold matching pairs only (negatives come from the batch)
    both = np.concatenate([a, b])
    for fit, (ref_components, ref_mean) in (("pca", fit_pca(both, 32)),
                                            ("learned_whitening", fit_learned_whitening(both, a[positive], b[positive], 32))):
        components, mean = fit_descriptor_pca(model, urls, 32, fit=fit)
        torch.testing.assert_close(mean, ref_mean, atol=1e-5, rtol=0)
        # the metric P^T P: axes of near-equal variance may turn between fits whose inputs differ in the last bits
        metric, ref_metric = components.T @ components, ref_components.T @ ref_components
        torch.testing.assert_close(metric, ref_metric, atol=1e-4 * float(ref_metric.abs().max()), rtol=0)
