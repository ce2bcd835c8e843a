"""Registry and gated promotion against a real `mlflow server` (HTTP) and the default SQLite file."""

from __future__ import annotations

import uuid

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline import load_descriptor
from pipeline.cli import main
from pipeline.config import Config
from pipeline.data.shards import shard_paths
from pipeline.data.stream import load_pairs
from pipeline.evaluate import evaluate_pairs
from pipeline.models import create_model
from pipeline.registry import CHALLENGER, CHAMPION, promote, register_checkpoint
from helpers import save_checkpoint
from pipeline.evaluate import METRIC
from pipeline.tracking import get_or_create_experiment


@pytest.fixture(params=["server", "sqlite"])
def tracking(request, tmp_path):
    if request.param == "server":
        return request.getfixturevalue("mlflow_server")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_promotion_is_gated_idempotent_and_reevaluated(tracking, synthetic_shards, tmp_path, monkeypatch):
    name_template = f"reg-{uuid.uuid4().hex[:8]}-{{arch}}"
    cfg = Config.model_validate({"data": {"shards": str(synthetic_shards), "eval_pairs": 512},
                                 "mlflow": {"tracking_uri": tracking, "registered_model": name_template}})
    name = cfg.mlflow.model_name("hardnet")
    pairs, labels, _ = load_pairs(shard_paths(synthetic_shards, "eval"), 512)
    client = MlflowClient(tracking)
    run_id = client.create_run(get_or_create_experiment(client, "registry-test")).info.run_id

    torch.manual_seed(0)
    good = create_model("hardnet").eval()
    bad = create_model("hardnet").eval()
    with torch.no_grad():
        for p in bad.parameters():
            p.zero_()  # every descriptor ties: FPR95 = 1
    good_fpr = evaluate_pairs(good, pairs, labels)[METRIC]
    assert good_fpr < 1.0

    v1 = register_checkpoint(cfg, save_checkpoint(tmp_path / "bad", bad, cfg), run_id, eval_pairs=(pairs, labels))
    first = promote(name, pairs, labels, tracking_uri=tracking)
    assert first.promoted and first.reason == "there was no champion" and first.challenger_fpr95 == 1.0
    again = promote(name, pairs, labels, tracking_uri=tracking)
    assert not again.promoted and again.reason == "the challenger is already the champion"

    v2 = register_checkpoint(cfg, save_checkpoint(tmp_path / "good", good, cfg), run_id, eval_pairs=(pairs, labels))
    aliases = lambda: {a: str(client.get_model_version_by_alias(name, a).version) for a in (CHAMPION, CHALLENGER)}  # noqa: E731
    assert aliases() == {CHAMPION: v1.version, CHALLENGER: v2.version}

    dry = promote(name, pairs, labels, dry_run=True, tracking_uri=tracking)
    assert not dry.promoted and aliases()[CHAMPION] == v1.version
    strict = promote(name, pairs, labels, min_improvement=1.0 - good_fpr + 0.01, tracking_uri=tracking)
    assert not strict.promoted and aliases()[CHAMPION] == v1.version
    # re-evaluated now, on these pairs: the figures are the models' own, not stored metrics
    assert strict.challenger_fpr95 == pytest.approx(good_fpr) and strict.champion_fpr95 == 1.0

    done = promote(name, pairs, labels, tracking_uri=tracking)
    assert done.promoted and aliases() == {CHAMPION: v2.version, CHALLENGER: v2.version}

    # The command, re-run: no change, no new version; the eval shards come from the version's tag.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
    assert main(["promote", "--model", name, "--eval-pairs", "512"]) == 0
    assert aliases()[CHAMPION] == v2.version
    assert len(client.search_model_versions(f"name = '{name}'")) == 2

    loaded = load_descriptor(f"models:/{name}@{CHAMPION}", tracking_uri=tracking)
    x = torch.rand(8, 1, 32, 32)
    torch.testing.assert_close(loaded(x), good(x))
