"""Bad configuration fails before Ray or MLflow start, with one message naming file, key and expectation."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import Config, ConfigError, load_config, load_sweep, parse_overrides

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
        ("data: {shards: s}\nmodel: {arch: matchnet}\nloss: {sos_weight: 1}\n", "loss.sos_weight", "pair classifier"),
        ("data: {shards: s}\nmodel: {arch: matchnet}\nloss: {compactness_weight: 1}\n", "loss.compactness_weight",
         "pair classifier"),
        ("data: {shards: s}\nmodel: {arch: tfeat}\nloss: {negatives: mixed}\n", "loss.negatives", "pair losses"),
        ("data: {shards: s}\nmodel: {arch: hardnet}\nloss: {relative_margin: 0.5}\n", "loss.relative_margin",
         "not hardnet's hardest_triplet (expected 0"),
        ("data: {shards: s}\nmodel: {arch: siamese}\nloss: {negatives: hardest, hard_candidates: nearest}\n",
         "loss.hard_candidates", "not siamese's contrastive (expected random)"),
        ("data: {shards: s}\nmodel: {arch: sosnet}\nloss: {sos_weight: 1}\ntrain: {batch_size: 8}\n", "train.batch_size",
         "expected more than loss.sos_knn = 8 pairs per rank"),
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


def load_like_the_cli(path: Path, tmp_path: Path) -> list[Config]:
    """A config file loaded the way its command loads it: a sweep with ``load_sweep`` (every
    architecture's model file, overrides and search space merged and validated), a model file as the
    ``base:`` of a sweep (its search space checked too), anything else with ``load_config``."""
    if path.parent.name == "sweeps":
        return load_sweep(path, available_cpus=2, available_gpus=0)
    if path.parent.name == "models":
        run = write(tmp_path, f"base: {path}\ndata: {{shards: s}}\nsweep: {{}}\n", name=f"uses-{path.name}")
        return [load_config(run, available_cpus=2, available_gpus=0)]
    return [load_config(path, available_cpus=2, available_gpus=0)]


SHIPPED = sorted((REPO / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO)))
def test_shipped_config_loads_as_its_command_loads_it(path, tmp_path):
    raw = yaml.safe_load(path.read_text())
    if path.name == "sift.yaml":  # the baseline's model file: evaluated in every table, never trained
        with pytest.raises(ConfigError, match="model.arch: 'sift' is a fixed baseline, not trainable"):
            load_like_the_cli(path, tmp_path)
        return
    configs = load_like_the_cli(path, tmp_path)
    if path.parent.name == "models":  # the model and its search space came along as the base
        assert configs[0].model.arch == path.stem and set(configs[0].sweep.search_space) == set(raw["search_space"])
    archs = (raw.get("sweep") or {}).get("architectures")
    assert [c.model.arch for c in configs] == (list(archs) if archs else [configs[0].model.arch])
    for cfg in configs:
        spec = (archs or {}).get(cfg.model.arch) or {}
        values = cfg.model_dump()
        for key, value in spec.get("overrides", {}).items():  # every override landed where it says
            section, field = key.split(".")
            assert values[section][field] == value, f"{path.name}: {cfg.model.arch}: {key}"
        if "search_space" in spec:
            assert set(cfg.sweep.search_space) == set(spec["search_space"])


@pytest.mark.parametrize("typo, expected", [
    (("train.batch_size: 64, train.time_budget_s: 25", "train.batchsize: 64, train.time_budget_s: 25"),
     "sweep.architectures.l2net.overrides: unknown key 'train.batchsize': train has epochs, batch_size,"),
    (("train.batch_size: 64, train.time_budget_s: 25", "train.batch_size: 1, train.time_budget_s: 25"),
     "(sweep.architectures.l2net over l2net.yaml): train.batch_size: expected greater than or equal to 2, got 1"),
    (("loss.margin: {grid: [0.5, 1.0]}", "loss.margn: {grid: [0.5, 1.0]}"),
     "sweep.architectures.tfeat.search_space: unknown key 'loss.margn'"),
    (("loss.margin: {grid: [0.5, 1.0]}", "loss.margin: {grid: [0.5, -1.0]}"),
     "(sweep.architectures.tfeat over tfeat.yaml): sweep.search_space.loss.margin: value -1.0 is invalid"),
    (("    sosnet: *short", "    sosnett: *short"),
     "sweep.architectures.sosnett: expected a registered model (hardnet, hardnet8"),
    (("model.pca_dim: 128", "model.pca_dims: 128"), "unknown key 'model.pca_dims': model has arch, dropout"),
])
def test_a_typo_in_a_shipped_sweep_is_caught_at_load(typo, expected, tmp_path):
    """The shipped demo sweep, copied with its model files and one typo: the same loading fails, naming
    the file, the architecture and the key, before anything starts."""
    (tmp_path / "configs").mkdir()
    for folder in ("sweeps", "models"):
        shutil.copytree(REPO / "configs" / folder, tmp_path / "configs" / folder)
    path = tmp_path / "configs" / "sweeps" / "demo.yaml"
    old, new = typo
    assert old in path.read_text()
    path.write_text(path.read_text().replace(old, new, 1))
    with pytest.raises(ConfigError) as err:
        load_like_the_cli(path, tmp_path)
    assert f"{path}" in str(err.value) and expected in str(err.value)


def test_a_typo_in_a_model_file_is_caught_through_the_sweep(tmp_path):
    (tmp_path / "configs").mkdir()
    for folder in ("sweeps", "models"):
        shutil.copytree(REPO / "configs" / folder, tmp_path / "configs" / folder)
    model_file = tmp_path / "configs" / "models" / "tfeat.yaml"
    model_file.write_text(model_file.read_text().replace("lr:", "lrate:", 1))
    with pytest.raises(ConfigError, match=r"\(sweep.architectures.tfeat over tfeat.yaml\): train.lrate: unknown key"):
        load_like_the_cli(tmp_path / "configs" / "sweeps" / "demo.yaml", tmp_path)
    with pytest.raises(ConfigError, match="train.lrate: unknown key"):
        load_like_the_cli(model_file, tmp_path)


def test_sweep_overrides_are_checked_like_set(tmp_path):
    """The same key check and message for a sweep's overrides as for --set."""
    path = write(tmp_path, "data: {shards: s}\nsweep: {architectures: {hardnet: {overrides: {train.epoch: 1}}}}\n")
    with pytest.raises(ConfigError) as from_file:
        load_config(path, available_cpus=2, available_gpus=0)
    with pytest.raises(ConfigError) as from_set:
        parse_overrides(["train.epoch=1"])
    message = str(from_set.value).removeprefix("--set 'train.epoch=1': ")
    assert f"{path}: sweep.architectures.hardnet.overrides: {message}" in str(from_file.value)
    # keys of the optional sweep section are keys too, in both places
    assert parse_overrides(["sweep.search_alg=optuna"]) == {"sweep.search_alg": "optuna"}
    path = write(tmp_path, "data: {shards: s}\nsweep: {architectures: {hardnet: {overrides: {sweep.search_alg: optuna}}}}\n")
    assert load_config(path, available_cpus=2, available_gpus=0).sweep.architectures["hardnet"].overrides == {"sweep.search_alg": "optuna"}


def test_model_options_are_checked_against_the_factory(tmp_path):
    path = write(tmp_path, "data: {shards: s}\nmodel: {arch: hardnet, dropout: 0.1, input_size: 64}\n")
    with pytest.raises(ConfigError, match=r"model: input_size: not an option of 'hardnet' \(its options: dropout\)"):
        load_config(path, available_cpus=2, available_gpus=0)
    path = write(tmp_path, "data: {shards: s}\nmodel: {arch: matchnet, pca_dim: 64}\n")
    with pytest.raises(ConfigError, match="pca_dim: 'matchnet' is not a trainable embedding model"):
        load_config(path, available_cpus=2, available_gpus=0)
    cfg = load_config(write(tmp_path, "data: {shards: s}\nmodel: {arch: hardnet, pca_dim: 64}\n"), available_cpus=2, available_gpus=0)
    assert cfg.model.attached_pca_dim == 64 and "pca_dim" not in cfg.model.factory_kwargs()
    cfg = load_config(write(tmp_path, "data: {shards: s}\nmodel: {arch: hardnet, pca_dim: 64, pca_fit: learned_whitening}\n"),
                      available_cpus=2, available_gpus=0)
    assert cfg.model.pca_fit == "learned_whitening" and "pca_fit" not in cfg.model.factory_kwargs()
    for text in ("{arch: hardnet, pca_fit: learned_whitening}", "{arch: hardnet8, pca_dim: 64, pca_fit: learned_whitening}"):
        with pytest.raises(ConfigError, match="pca_fit: 'learned_whitening' fits the head the pipeline attaches, which needs "
                                              "model.pca_dim"):
            load_config(write(tmp_path, f"data: {{shards: s}}\nmodel: {text}\n"), available_cpus=2, available_gpus=0)
    with pytest.raises(ConfigError, match="pca_fit"):
        load_config(write(tmp_path, "data: {shards: s}\nmodel: {arch: hardnet, pca_dim: 64, pca_fit: zca}\n"),
                    available_cpus=2, available_gpus=0)
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
