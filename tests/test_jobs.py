"""Ray Jobs submission (`patchflow submit` / `patchflow jobs`) against a REAL head node.

One head is started for this module with `ray start --head --block` in its own process group,
its own temp dir, HOME and ports, and token auth on with a token of our own (RAY_AUTH_MODE=token):
it does not touch the session-wide in-process cluster of conftest.py (`ray_cluster`), nor the
user's ~/.ray. Every process the head starts inherits our random token in its environment, which
is how teardown finds (and kills, by pid) exactly those processes, job drivers included.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from helpers import FEW_IMAGES, free_ports, small_config
from pipeline import submit

VENV_BIN = Path(sys.executable).parent
HEAD_START_TIMEOUT_S = 120
JOB_TIMEOUT_S = 240  # a job still running then is stopped: the test fails instead of hanging


# ----------------------------------------------------------------------------- fast unit checks

def test_runtime_env_carries_code_and_set_variables_only(tmp_path):
    environ = {"MLFLOW_TRACKING_URI": "http://env:5000", "AWS_ACCESS_KEY_ID": "AK", "AWS_SECRET_ACCESS_KEY": "SK",
               "RAY_STORAGE": "s3://b/r", "AWS_ENDPOINT_URL": "", "RAY_AUTH_TOKEN": "secret", "HOME": "/root", "X": "1"}
    env = submit.forwarded_env("http://flag:5000", ["EXTRA=1", "X"], environ=environ)
    assert env == {"MLFLOW_TRACKING_URI": "http://flag:5000", "AWS_ACCESS_KEY_ID": "AK", "AWS_SECRET_ACCESS_KEY": "SK",
                   "RAY_STORAGE": "s3://b/r", "EXTRA": "1", "X": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    assert submit.forwarded_env(None, environ=environ)["MLFLOW_TRACKING_URI"] == "http://env:5000"
    assert submit.forwarded_env(None, ["X"], environ=environ, forward=False) == {"X": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    assert "loopback" in submit.tracking_uri_note("http://localhost:5000")
    assert "local file" in submit.tracking_uri_note("sqlite:////tmp/m.db")
    assert submit.tracking_uri_note("http://mlflow:5000") is None

    uploaded = submit.build_runtime_env(image_install=False, env_vars=env)
    assert uploaded["working_dir"] == str(submit.REPO_ROOT) and "/.venv" in uploaded["excludes"] and "/shards" in uploaded["excludes"]
    assert "working_dir" not in submit.build_runtime_env(image_install=True, env_vars=env)

    inside = submit.REPO_ROOT / "configs" / "train.yaml"
    assert submit.job_config_path(inside, image_install=False) == ("configs/train.yaml", None)
    path, warning = submit.job_config_path(tmp_path / "c.yaml", image_install=False)
    assert path == str(tmp_path / "c.yaml") and "outside the uploaded working dir" in warning
    assert submit.build_entrypoint("sweep", config="configs/s.yaml", sets=["loss.margin=0.5"], extra=["--no-register"],
                                   image_install=False) == "python jobs/entrypoint.py sweep --config configs/s.yaml --set loss.margin=0.5 --no-register"
    assert submit.build_entrypoint("shards", config=None, sets=[], extra=["synthetic", "--out", "/d d"],
                                   image_install=True) == "python -m pipeline.cli shards synthetic --out '/d d'"


def test_repo_root_to_upload(tmp_path, monkeypatch):
    assert submit.find_repo_root() == submit.REPO_ROOT  # this checkout (editable install)
    monkeypatch.setattr(submit, "REPO_ROOT", tmp_path / "site-packages")  # a non-editable install
    assert submit.find_repo_root(cwd=Path(__file__).resolve().parents[1]) == Path(__file__).resolve().parents[1]
    with pytest.raises(submit.SubmitError, match="--image-install"):
        submit.find_repo_root(cwd=tmp_path)


def test_token_sources_in_order(tmp_path):
    f = tmp_path / "tok"
    f.write_text("from-file\n")
    p = tmp_path / "tok2"
    p.write_text("from-path")
    assert submit.resolve_token(f, {"RAY_AUTH_TOKEN": "from-env"})[0] == "from-file"
    assert submit.resolve_token(None, {"RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": str(p)})[0] == "from-env"
    assert submit.resolve_token(None, {"RAY_AUTH_TOKEN_PATH": str(p)})[0] == "from-path"
    assert submit.resolve_token(None, {})[0] is None
    with pytest.raises(submit.SubmitError, match="cannot read"):
        submit.resolve_token(tmp_path / "missing", {})
    assert submit.resolve_address("head:8265", {}) == "http://head:8265"
    assert submit.resolve_address(None, {"RAY_ADDRESS": "10.0.0.1:6379", "RAY_API_SERVER_ADDRESS": "http://h:8265"}) == "http://h:8265"
    with pytest.raises(submit.SubmitError, match="no cluster address"):
        submit.resolve_address(None, {"RAY_ADDRESS": "10.0.0.1:6379"})


def test_shards_and_promote_steps_need_their_arguments(capsys):
    assert submit.main(["submit", "shards", "--address", "http://127.0.0.1:1"]) == 2
    assert "submit shards: pass its arguments after --, e.g. -- synthetic --out" in capsys.readouterr().err
    assert submit.main(["submit", "promote", "--address", "http://127.0.0.1:1"]) == 2
    assert "submit promote: pass its arguments after --, e.g. -- --model patchflow-hardnet" in capsys.readouterr().err
    entry = submit.build_entrypoint("promote", config=None, sets=[], extra=["--model", "patchflow-hardnet"], image_install=False)
    assert entry == "python jobs/entrypoint.py promote --model patchflow-hardnet"


# ----------------------------------------------------------------------------- the real head

def _pids_with_marker(marker: bytes) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if marker in f.read():
                        pids.append(int(entry))
            except OSError:
                pass
    return pids


def _stop_head(proc: subprocess.Popen, marker: bytes) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # `ray start --block` and the daemons it started
    except ProcessLookupError:
        pass
    proc.wait(30)
    deadline = time.monotonic() + 15
    while (pids := _pids_with_marker(marker)) and time.monotonic() < deadline:  # workers, job drivers
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from pipeline.data.synthetic import generate_synthetic

    out = tmp_path_factory.mktemp("job-shards")
    generate_synthetic(out, train_pairs=1024, eval_pairs=256, pairs_per_block=64, blocks_per_shard=2,
                       images=FEW_IMAGES, progress=False)
    return out


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A real Ray head: 2 CPUs, 2 trial slots, Jobs API on 127.0.0.1, token auth with our token."""
    root = Path(tempfile.mkdtemp(prefix="pfray-", dir="/tmp"))  # short: Ray's unix sockets live under it
    token = secrets.token_hex(24)
    token_file = root / "token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    (root / "home").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "MLFLOW_TRACKING_URI"}
    env.update(
        HOME=str(root / "home"),  # nothing lands in the real ~/.ray or ~/.config
        RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token,
        RAY_USAGE_STATS_ENABLED="0", MLFLOW_DISABLE_TELEMETRY="true",
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",  # the job's `python` is this venv's
    )
    names = ("port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
             "runtime-env-agent-port", "ray-client-server-port", "node-manager-port", "object-manager-port")
    dashboard_port, *component_ports = free_ports(1 + len(names))
    ports = dict(zip(names, component_ports))
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--num-cpus=2", '--resources={"trial_slot": 2}',
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", f"--temp-dir={root / 'r'}",
           "--disable-usage-stats", *(f"--{k}={v}" for k, v in ports.items())]
    log = open(root / "head.log", "w")
    proc = subprocess.Popen(cmd, env=env, cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        t0 = time.monotonic()
        while True:
            try:
                req = urllib.request.Request(f"{address}/api/version", headers={"Authorization": f"Bearer {token}"})
                urllib.request.urlopen(req, timeout=2).read()
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if proc.poll() is not None or time.monotonic() - t0 > HEAD_START_TIMEOUT_S:
                    raise RuntimeError(f"ray head did not come up:\n{(root / 'head.log').read_text()[-3000:]}")
                time.sleep(0.5)
        print(f"[test_jobs] head up in {time.monotonic() - t0:.1f} s at {address}")
        yield SimpleNamespace(address=address, token=token, token_file=str(token_file), root=root)
    finally:
        _stop_head(proc, marker=f"RAY_AUTH_TOKEN={token}".encode())
        log.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def client(head):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(head.address, headers={"Authorization": f"Bearer {head.token}"})


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)


def _write_config(path: Path, shards: Path, runs: Path, **sections) -> Path:
    cfg = small_config(shards, runs, None,
                       data={"eval_pairs": 256},
                       train={"epochs": 1, "batches_per_epoch": 3, "batch_size": 16},
                       scaling={"num_workers": 1},
                       mlflow={"experiment": "jobs-test"})
    raw = cfg.model_dump(mode="json", exclude_none=True)
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(raw))
    return path


def _cli(*argv: str) -> int:
    return submit.main([str(a) for a in argv])


def _guard(client, job_id: str) -> threading.Timer:
    """Stop the job if it is still running after JOB_TIMEOUT_S: a broken job fails the test, not hang it."""
    timer = threading.Timer(JOB_TIMEOUT_S, lambda: client.stop_job(job_id))
    timer.daemon = True
    timer.start()
    return timer


@pytest.mark.ray
def test_train_job_succeeds_and_logs_to_mlflow(head, client, shards, tmp_path, monkeypatch, capsys, clean_env):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # forwarded to the job through env_vars
    config = _write_config(tmp_path / "train.yaml", shards, tmp_path)
    job_id = f"test-train-{secrets.token_hex(3)}"
    timer = _guard(client, job_id)
    t0 = time.monotonic()
    rc = _cli("submit", "train", "--address", head.address, "--token-file", head.token_file, "--config", config,
              "--set", "run.name=job-train", "--submission-id", job_id, "--wait")
    timer.cancel()
    out = capsys.readouterr().out
    print(f"[test_jobs] train job: {time.monotonic() - t0:.1f} s")
    assert rc == 0, out[-4000:]
    assert f"submitted {job_id}" in out and f"patchflow jobs logs {job_id} --follow" in out
    assert "eval_fpr95=" in out and f"job {job_id}: SUCCEEDED" in out  # the driver's output, streamed

    info = client.get_job_info(job_id)
    assert str(info.status) == "SUCCEEDED"
    assert info.runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] == uri
    assert info.runtime_env["working_dir"].startswith("gcs://")  # the repository, uploaded
    assert "RAY_AUTH_TOKEN" not in info.runtime_env["env_vars"]
    assert info.entrypoint.startswith("python jobs/entrypoint.py train --config ")

    mlflow_client = MlflowClient(uri)
    exp = mlflow_client.get_experiment_by_name("jobs-test")
    runs = mlflow_client.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["patchflow.run_name"] == "job-train" and runs[0].data.params["train.batch_size"] == "16"
    assert (tmp_path / "runs" / "job-train").is_dir()

    assert _cli("jobs", "logs", job_id, "--address", head.address, "--token-file", head.token_file) == 0
    assert "eval_fpr95=" in capsys.readouterr().out
    assert _cli("jobs", "list", "--address", head.address, "--token-file", head.token_file) == 0
    listing = capsys.readouterr().out
    assert job_id in listing and "SUCCEEDED" in listing


@pytest.mark.ray
def test_stop_a_running_job(head, client, tmp_path, monkeypatch, capsys, clean_env):
    monkeypatch.setenv("RAY_AUTH_TOKEN", head.token)  # the token from the environment this time
    job_id = f"test-stop-{secrets.token_hex(3)}"
    # A shards job far too large to finish: it runs until stopped. No upload this time: the job
    # runs `python -m pipeline.cli` from the installed package, as in the cluster image.
    rc = _cli("submit", "shards", "--address", head.address, "--submission-id", job_id, "--image-install",
              "--", "synthetic", "--out", tmp_path / "big", "--train-pairs", "50000000", "--eval-pairs", "1000")
    assert rc == 0, capsys.readouterr()
    deadline = time.monotonic() + 90
    while str(status := client.get_job_status(job_id)) == "PENDING" and time.monotonic() < deadline:
        time.sleep(0.3)
    assert str(status) == "RUNNING", client.get_job_logs(job_id)[-3000:]
    info = client.get_job_info(job_id)
    assert "working_dir" not in info.runtime_env and info.entrypoint.startswith("python -m pipeline.cli shards synthetic")
    capsys.readouterr()
    assert _cli("jobs", "stop", job_id, "--wait", "--address", head.address) == 0
    assert f"{job_id}: STOPPED" in capsys.readouterr().out
    assert str(client.get_job_status(job_id)) == "STOPPED"
    assert _cli("jobs", "status", job_id, "--address", head.address) == 0
    assert "STOPPED" in capsys.readouterr().out


@pytest.mark.ray
def test_config_invalid_on_the_cluster_fails_the_job_with_the_message(head, client, shards, tmp_path, capsys, clean_env):
    config = _write_config(tmp_path / "bad.yaml", shards, tmp_path, train={"batch_size": 1})
    job_id = f"test-badremote-{secrets.token_hex(3)}"
    timer = _guard(client, job_id)
    rc = _cli("submit", "train", "--address", head.address, "--token-file", head.token_file, "--config", config,
              "--submission-id", job_id, "--no-validate", "--wait")
    timer.cancel()
    out = capsys.readouterr().out
    assert rc == 1, out[-3000:]
    assert f"job {job_id}: FAILED" in out
    message = "train.batch_size: expected greater than or equal to 2, got 1"
    assert message in out  # streamed while waiting
    logs = client.get_job_logs(job_id)
    assert "invalid configuration" in logs and message in logs
    assert "Traceback" not in logs  # one clear message, not a stack trace


@pytest.mark.ray
def test_config_invalid_locally_fails_before_submission(head, client, shards, tmp_path, capsys, clean_env):
    config = _write_config(tmp_path / "bad.yaml", shards, tmp_path, train={"batch_size": 1})
    job_id = f"test-badlocal-{secrets.token_hex(3)}"
    rc = _cli("submit", "train", "--address", head.address, "--token-file", head.token_file, "--config", config,
              "--submission-id", job_id, "--wait")
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith(f"patchflow: error: {config}: invalid configuration")
    assert "train.batch_size: expected greater than or equal to 2, got 1" in err
    assert job_id not in [j.submission_id for j in client.list_jobs()]
    # --set overrides are validated too
    assert _cli("submit", "train", "--address", head.address, "--config", config, "--set", "train.nope=1") == 2
    assert "unknown key 'train.nope'" in capsys.readouterr().err


@pytest.mark.ray
def test_missing_or_wrong_token_is_refused(head, tmp_path, capsys, clean_env):
    assert _cli("jobs", "list", "--address", head.address) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"patchflow: error: cannot use the Ray Jobs API at {head.address}: Authentication")
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-token")
    assert _cli("jobs", "list", "--address", head.address, "--token-file", wrong) == 1
    assert "Authentication failed" in capsys.readouterr().err
