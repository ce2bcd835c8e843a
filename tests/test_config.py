"""Bad configuration fails before Ray or MLflow start, with one message naming file, key and expectation."""

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config, parse_overrides

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text, key, expected",
    [
        ("data: {shards: s}\nloss: {margin: -1}\n", "loss.margin", "expected greater than 0, got -1"),
        ("data: {shards: s}\ntrain: {batch_size: 1}\n", "train.batch_size", "expected greater than or equal to 2, got 1"),
        ("data: {shards: s}\ntrain: {epochs: three}\n", "train.epochs", "expected a valid integer"),
        ("data: {shards: s}\ntrain: {epoch: 3}\n", "train.epoch", "unknown key"),
        ("train: {epochs: 3}\n", "data", "required key is missing"),
        ("data: {shards: s}\nscaling: {num_workers: 64}\n", "scaling.num_workers", "expected num_workers x cpus_per_worker <= 2"),
        ("data: {shards: s}\nscaling: {num_workers: 1, use_gpu: true}\n", "scaling.num_workers", "at most 0 (GPUs available)"),
        (
            "data: {shards: s}\nsweep: {search_space: {loss.margin: {choice: [0.5, -1]}}}\n",
            "sweep.search_space.loss.margin",
            "value -1 is invalid",
        ),
        ("data: {shards: s}\nsweep: {search_space: {loss.marg: {choice: [1]}}}\n", "sweep.search_space", "unknown key 'loss.marg'"),
    ],
)
def test_error_names_file_key_and_expectation(tmp_path, text, key, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path, available_cpus=2, available_gpus=0)
    message = str(err.value)
    assert f"{path}: {key}" in message
    assert expected in message


def test_all_problems_in_one_message(tmp_path):
    path = write(tmp_path, "data: {shards: s, extra: 1}\nloss: {margin: 0}\ntrain: {batch_size: 0}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, available_cpus=2, available_gpus=0)
    lines = str(err.value).splitlines()
    assert len(lines) == 4 and all(str(path) in line for line in lines)


def test_overrides_are_validated_and_relative_paths_resolved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, "data: {shards: myshards}\n")
    cfg = load_config(path, parse_overrides(["train.epochs=5", "loss.margin=0.5"]), available_cpus=2, available_gpus=0)
    assert cfg.train.epochs == 5 and cfg.loss.margin == 0.5
    assert cfg.data.shards == str(tmp_path / "myshards") and cfg.run.storage_path == str(tmp_path / "runs")
    with pytest.raises(ConfigError, match=r"--set 'train.epoch=5': unknown key 'train.epoch'"):
        parse_overrides(["train.epoch=5"])
    with pytest.raises(ConfigError, match="train.batch_size: expected greater than or equal to 2"):
        load_config(path, parse_overrides(["train.batch_size=1"]), available_cpus=2, available_gpus=0)


def test_shipped_configs_are_valid():
    for path in sorted((REPO / "configs").rglob("*.yaml")):
        if path.parent.name != "models":
            load_config(path, available_cpus=2, available_gpus=0)


def test_every_model_config_is_a_valid_base(tmp_path):
    from pipeline.models import list_models

    for arch in list_models():
        if arch.startswith("opencv_"):  # no model file: OpenCV baselines are never trained or swept
            continue
        run = write(tmp_path, f"base: {REPO}/configs/models/{arch}.yaml\ndata: {{shards: s}}\nsweep: {{}}\n")
        if arch == "sift":
            with pytest.raises(ConfigError, match="model.arch: 'sift' is a fixed baseline, not trainable"):
                load_config(run, available_cpus=2, available_gpus=0)
            continue
        cfg = load_config(run, available_cpus=2, available_gpus=0)
        assert cfg.model.arch == arch and cfg.sweep.search_space  # the model's search space came along


def test_model_options_are_checked_against_the_factory(tmp_path):
    path = write(tmp_path, "data: {shards: s}\nmodel: {arch: hardnet, dropout: 0.1, input_size: 64}\n")
    with pytest.raises(ConfigError, match=r"model: input_size: not an option of 'hardnet' \(its options: dropout\)"):
        load_config(path, available_cpus=2, available_gpus=0)
    path = write(tmp_path, "data: {shards: s}\nmodel: {arch: matchnet, pca_dim: 64}\n")
    with pytest.raises(ConfigError, match="pca_dim: 'matchnet' is not a trainable embedding model"):
        load_config(path, available_cpus=2, available_gpus=0)
    cfg = load_config(write(tmp_path, "data: {shards: s}\nmodel: {arch: hardnet, pca_dim: 64}\n"), available_cpus=2, available_gpus=0)
    assert cfg.model.attached_pca_dim == 64 and "pca_dim" not in cfg.model.factory_kwargs()
    path = write(tmp_path, "data: {shards: s}\nmodel: {arch: resnet}\n")
    with pytest.raises(ConfigError, match="model: arch: expected one of hardnet, hardnet8"):
        load_config(path, available_cpus=2, available_gpus=0)


def test_cli_fails_before_anything_starts(tmp_path):
    """The real command, in a fresh process: exit 2, the message, and no Ray session, no MLflow
    database, no run folder created."""
    path = write(tmp_path, "data: {shards: shards}\ntrain: {batch_size: 1}\nscaling: {num_workers: 1}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "train", "--config", str(path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert f"{path}: train.batch_size: expected greater than or equal to 2, got 1" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml"]  # no mlflow.db, runs/, shards/
    assert "ray" not in proc.stdout.lower() + proc.stderr.lower().replace(str(path).lower(), "")
