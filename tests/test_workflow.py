"""pipeline.workflow called directly, without Ray: what ``run.name`` does before training starts.
The sweep's report is tested in tests/test_sweep_registry_ray.py (on the sweep those tests share),
the evaluation commands' functions in tests/test_evaluation.py."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from helpers import small_config


def test_a_run_name_finds_its_mlflow_run_again_and_a_new_name_opens_another(tmp_path):
    """What `patchflow train` does with ``run.name`` before Ray starts (tests/test_train_resume.py
    kills and resumes a real run): the same name reopens its MLflow run, which has the config's
    parameters; a new name gets a run of its own."""
    from pipeline.workflow import _open_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = small_config(tmp_path / "shards", tmp_path, uri)
    client = MlflowClient(uri)
    first = _open_run(client, cfg, "resumable")
    assert _open_run(client, cfg, "resumable") == first
    other = _open_run(client, cfg, "another")
    assert other != first
    runs = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    assert {r.data.tags["patchflow.run_name"]: r.info.run_id for r in runs} == {"resumable": first, "another": other}
    assert client.get_run(first).data.params["train.epochs"] == "2"
