"""Ray Jobs: submit a patchflow step to a Ray cluster and manage the jobs running there.

    patchflow submit train --address http://HEAD:8265 --config configs/train.yaml [--set k=v] [--wait]
    patchflow submit sweep --address http://HEAD:8265 --config configs/sweeps/demo.yaml -- --no-register
    patchflow submit shards --address http://HEAD:8265 -- synthetic --out /shared/shards
    patchflow jobs list --address http://HEAD:8265
    patchflow jobs logs JOB_ID [--follow] --address ...     patchflow jobs stop JOB_ID [--wait] --address ...

The job runs ``python jobs/entrypoint.py <step> ...`` (the CLI, unchanged) with the repository
uploaded as its ``working_dir``; with ``--image-install`` nothing is uploaded and the job runs
``python -m pipeline.cli <step> ...`` from the package installed in the cluster's image.
The config is validated here first (same message, exit 2) and again by the job on the cluster.

Auth: Ray >= 2.59 protects the Jobs API of local clusters with a token (``RAY_AUTH_MODE=token``).
The token is sent as ``Authorization: Bearer ...``, read from ``--token-file``, else
``$RAY_AUTH_TOKEN``, else the file named by ``$RAY_AUTH_TOKEN_PATH``; without any of them Ray's
own client rules apply (``~/.ray/auth_token`` when ``RAY_AUTH_MODE=token`` is set here).
The token is never put into the job's runtime environment.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shlex
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Mapping

STEPS = ("shards", "train", "sweep", "promote")
REPO_ROOT = Path(__file__).resolve().parents[1]
ENTRYPOINT_SCRIPT = "jobs/entrypoint.py"

# Never uploaded with the working_dir (gitignore syntax, relative to the repo root; Ray also
# honours .gitignore and skips .git / .venv by default).
WORKING_DIR_EXCLUDES = [
    "/.venv", "/.git", "/shards", "/runs", "/mlflow.db", "/mlartifacts", "/.ray_tmp", "/.cache",
    "__pycache__", ".pytest_cache", "*.egg-info",
]
# Copied from the submitter's environment into the job's env_vars when set (names only are printed).
FORWARDED_ENV = (
    "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_S3_ENDPOINT_URL", "MLFLOW_S3_IGNORE_TLS",
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
)
FORWARDED_PREFIXES = ("RAY_STORAGE",)
NEVER_FORWARDED = ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")
BIG = 10**9  # cluster capacity is unknown here: the job checks CPUs/GPUs on the cluster itself


class SubmitError(RuntimeError):
    """A problem talking to the cluster (address, auth, unknown job): exit 1."""


# ----------------------------------------------------------------------------- pieces (testable)

def resolve_address(address: str | None, environ: Mapping[str, str] = os.environ) -> str:
    """``--address``, else $RAY_API_SERVER_ADDRESS, else an http(s) $RAY_ADDRESS; ``host:port`` gets http://."""
    candidates = [address, environ.get("RAY_API_SERVER_ADDRESS")]
    ray_address = environ.get("RAY_ADDRESS", "")
    if ray_address.startswith(("http://", "https://")):
        candidates.append(ray_address)
    for value in candidates:
        if value:
            return value if "://" in value else f"http://{value}"
    raise SubmitError("no cluster address: pass --address http://HEAD:8265 (or set RAY_API_SERVER_ADDRESS)")


def resolve_token(token_file: str | os.PathLike | None = None, environ: Mapping[str, str] = os.environ) -> tuple[str | None, str]:
    """(token, where it came from); (None, reason) when none is configured."""
    sources: list[tuple[str, str | None]] = []
    if token_file:
        sources.append((f"--token-file {token_file}", str(token_file)))
    elif environ.get("RAY_AUTH_TOKEN", "").strip():
        return environ["RAY_AUTH_TOKEN"].strip(), "$RAY_AUTH_TOKEN"
    elif environ.get("RAY_AUTH_TOKEN_PATH"):
        sources.append(("$RAY_AUTH_TOKEN_PATH", environ["RAY_AUTH_TOKEN_PATH"]))
    for label, path in sources:
        try:
            token = Path(path).expanduser().read_text().strip()
        except OSError as e:
            raise SubmitError(f"{label}: cannot read the Ray auth token: {e.strerror or e}") from None
        if not token:
            raise SubmitError(f"{label}: the token file is empty")
        return token, label
    return None, "none (Ray's defaults: ~/.ray/auth_token if RAY_AUTH_MODE=token)"


def make_client(address: str | None, token_file: str | None = None):
    from ray.job_submission import JobSubmissionClient

    url = resolve_address(address)
    token, _ = resolve_token(token_file)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(url, headers=headers)
    except Exception as e:  # ConnectionError, ray.exceptions.AuthenticationError, ...
        raise SubmitError(f"cannot use the Ray Jobs API at {url}: {_first_lines(e)}") from None


def forwarded_env(tracking_uri: str | None = None, extra: list[str] | None = None,
                  environ: Mapping[str, str] = os.environ, forward: bool = True) -> dict[str, str]:
    """The job's env_vars: storage / tracking variables set here (unless ``forward`` is false),
    ``--tracking-uri`` over $MLFLOW_TRACKING_URI, then ``--env KEY=VALUE`` (``--env KEY`` copies KEY from here)."""
    env = {k: v for k, v in environ.items()
           if forward and v and (k in FORWARDED_ENV or k.startswith(FORWARDED_PREFIXES)) and k not in NEVER_FORWARDED}
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    for item in extra or []:
        key, sep, value = item.partition("=")
        if not key:
            raise SubmitError(f"--env {item!r}: expected KEY=VALUE or KEY")
        if not sep:
            if key not in environ:
                raise SubmitError(f"--env {key}: not set in this environment")
            value = environ[key]
        env[key] = value
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    return env


def tracking_uri_note(uri: str | None) -> str | None:
    """A warning when the job would log somewhere that only exists on this machine."""
    from urllib.parse import urlparse

    if not uri:
        return None
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file", "sqlite"):
        return f"MLFLOW_TRACKING_URI={uri} is a local file: the job writes it on the cluster (fine for a single machine or a shared volume)"
    if parsed.hostname in ("localhost", "127.0.0.1", "::1"):
        return (f"MLFLOW_TRACKING_URI={uri} is a loopback address: on a remote cluster the job cannot reach it "
                "(pass the in-cluster URI with --tracking-uri, e.g. http://mlflow:5000, or --no-forward-env)")
    return None


def find_repo_root(cwd: Path | None = None) -> Path:
    """The checkout to upload: this package's own (an editable install), else the working
    directory when it is a patchflow checkout. A non-editable install has neither: --image-install."""
    for root in (REPO_ROOT, (cwd or Path.cwd()).resolve()):
        if (root / ENTRYPOINT_SCRIPT).is_file() and (root / "pipeline" / "__init__.py").is_file():
            return root
    raise SubmitError(f"no patchflow checkout to upload (no {ENTRYPOINT_SCRIPT} beside the package or in the working "
                      "directory): run from the repository root, or pass --image-install to use the cluster image's package")


def build_runtime_env(*, image_install: bool, working_dir: str | os.PathLike = REPO_ROOT,
                      env_vars: dict[str, str] | None = None) -> dict[str, Any]:
    runtime_env: dict[str, Any] = {"env_vars": dict(env_vars or {})}
    if not image_install:
        runtime_env["working_dir"] = str(Path(working_dir).resolve())
        runtime_env["excludes"] = list(WORKING_DIR_EXCLUDES)
    return runtime_env


def job_config_path(config: str | os.PathLike, *, image_install: bool, working_dir: Path = REPO_ROOT) -> tuple[str, str | None]:
    """The --config argument the job gets, and a warning when the cluster may not see that file.

    With a working_dir upload the job runs in the uploaded copy of the repository: a config
    inside it travels as a relative path. Anything else must exist at the same path on the
    cluster (a shared volume, or the image)."""
    path = Path(config)
    if not image_install:
        absolute, root = path.resolve(), working_dir.resolve()
        if absolute.is_relative_to(root):
            return absolute.relative_to(root).as_posix(), None
        return str(absolute), (f"{config} is outside the uploaded working dir {root}: the job reads "
                               f"{absolute} on the cluster (a shared volume, or the same machine)")
    if not path.is_absolute():
        return str(config), (f"--image-install: the job resolves {config} against its working directory on the cluster "
                             "(/app in k8s/Dockerfile's image)")
    return str(config), None


def build_entrypoint(step: str, *, config: str | None, sets: list[str], extra: list[str], image_install: bool) -> str:
    argv = ["python", "-m", "pipeline.cli"] if image_install else ["python", ENTRYPOINT_SCRIPT]
    argv.append(step)
    if config is not None:
        argv += ["--config", config]
    for item in sets:
        argv += ["--set", item]
    argv += extra
    return shlex.join(argv)


def validate_locally(step: str, config: str, sets: list[str]):
    """The checks ``patchflow train/sweep`` make before Ray starts (a sweep: every architecture's
    expanded config), minus this machine's capacity."""
    from pipeline.config import load_config, load_sweep, parse_overrides

    if step == "sweep":
        return load_sweep(config, parse_overrides(sets), available_cpus=BIG, available_gpus=BIG)[0]
    return load_config(config, parse_overrides(sets), available_cpus=BIG, available_gpus=BIG)


def follow(client, job_id: str, *, out=None, poll_s: float = 1.0) -> str:
    """Print the job's logs until it ends; returns the final status (a JobStatus string)."""
    out = out or sys.stdout
    written = 0

    async def tail() -> None:
        nonlocal written
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()
            written += len(chunk)

    try:
        asyncio.run(tail())
    except Exception as e:  # e.g. a proxy without websockets, or a dropped connection: poll instead
        print(f"[patchflow] log streaming failed ({_first_lines(e, 1)}); polling", file=sys.stderr)
        seen = written
        while True:
            status = client.get_job_status(job_id)
            logs = client.get_job_logs(job_id)
            out.write(logs[seen:])
            out.flush()
            seen = len(logs)
            if status.is_terminal():
                break
            time.sleep(poll_s)
    # The log stream closes when the driver exits; the status may lag by a moment.
    deadline = time.monotonic() + 30
    status = client.get_job_status(job_id)
    while not status.is_terminal() and time.monotonic() < deadline:
        time.sleep(0.5)
        status = client.get_job_status(job_id)
    return str(status)


def wait_terminal(client, job_id: str, timeout_s: float | None = None, poll_s: float = 0.5) -> str:
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status = client.get_job_status(job_id)
        if status.is_terminal() or (deadline is not None and time.monotonic() > deadline):
            return str(status)
        time.sleep(poll_s)


def _exit_code(status: str) -> int:
    return 0 if status == "SUCCEEDED" else 1


def _first_lines(e: BaseException, n: int = 3) -> str:
    text = str(e).strip() or type(e).__name__
    return "\n  ".join(text.splitlines()[:n])


def _error(message: str, code: int) -> int:
    print(f"patchflow: error: {message}", file=sys.stderr)
    return code


# ----------------------------------------------------------------------------- commands

def cmd_submit(args) -> int:
    from pipeline.config import ConfigError

    step = args.step
    extra = list(args.extra or [])
    if extra[:1] == ["--"]:
        extra = extra[1:]
    try:
        if step in ("shards", "promote"):
            example = "-- synthetic --out /shared/shards" if step == "shards" else "-- --model patchflow-hardnet"
            if args.config is not None or args.set:
                raise ConfigError(f"submit {step} takes no --config / --set: pass its arguments after --, e.g. {example}")
            if not extra:
                raise ConfigError(f"submit {step}: pass its arguments after --, e.g. {example}")
            cfg = None
        else:
            if args.config is None:
                raise ConfigError(f"submit {step}: --config is required")
            cfg = None if args.no_validate else validate_locally(step, str(args.config), args.set or [])
    except ConfigError as e:
        return _error(str(e), 2)

    try:
        root = None if args.image_install else find_repo_root()
        env_vars = forwarded_env(args.tracking_uri, args.env, forward=not args.no_forward_env)
        note = tracking_uri_note(env_vars.get("MLFLOW_TRACKING_URI"))
        if note:
            print(f"[patchflow] note: {note}", file=sys.stderr)
        config_arg, warning = (None, None)
        if args.config is not None:
            config_arg, warning = job_config_path(args.config, image_install=args.image_install, working_dir=root or REPO_ROOT)
        if warning:
            print(f"[patchflow] note: {warning}", file=sys.stderr)
        if cfg is not None and cfg.mlflow.tracking_uri is None and "MLFLOW_TRACKING_URI" not in env_vars:
            print("[patchflow] note: no MLFLOW_TRACKING_URI (flag --tracking-uri, environment or mlflow.tracking_uri): "
                  "the job logs to mlflow.db in its working directory on the cluster", file=sys.stderr)
        entrypoint = build_entrypoint(step, config=config_arg, sets=args.set or [], extra=extra, image_install=args.image_install)
        runtime_env = build_runtime_env(image_install=args.image_install, working_dir=root or REPO_ROOT, env_vars=env_vars)
        client = make_client(args.address, args.token_file)
        # Ray's packaging chatter (".gitignore ignored", ".venv now ignored by default") is noise here.
        logging.getLogger("ray._private.runtime_env").setLevel(logging.ERROR)
        submission_id = args.submission_id or f"patchflow-{step}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        try:
            job_id = client.submit_job(
                entrypoint=entrypoint,
                runtime_env=runtime_env,
                submission_id=submission_id,
                metadata={"patchflow.step": step, "patchflow.config": str(args.config or "")},
                entrypoint_num_cpus=args.entrypoint_num_cpus,
            )
        except Exception as e:
            raise SubmitError(f"submission to {client.get_address()} failed: {_first_lines(e)}") from None
    except SubmitError as e:
        return _error(str(e), 1)

    address = client.get_address()
    where = "the image's installed package" if args.image_install else f"working_dir {root}"
    print(f"[patchflow] submitted {job_id} to {address}")
    print(f"[patchflow]   entrypoint: {entrypoint}")
    print(f"[patchflow]   code from {where}; env_vars: {', '.join(sorted(env_vars)) or 'none'}")
    print(f"[patchflow]   follow: patchflow jobs logs {job_id} --follow --address {address}")
    print(f"[patchflow]   stop:   patchflow jobs stop {job_id} --address {address}")
    print(f"[patchflow]   dashboard: {address}/#/jobs/{job_id}")
    sys.stdout.flush()
    if not args.wait:
        return 0
    try:
        status = follow(client, job_id)
    except KeyboardInterrupt:
        print(f"\n[patchflow] stopped following; {job_id} keeps running (patchflow jobs stop {job_id} --address {address})")
        return 130
    except Exception as e:
        return _error(f"lost track of {job_id}: {_first_lines(e)} (patchflow jobs status {job_id} --address {address})", 1)
    print(f"[patchflow] job {job_id}: {status}")
    return _exit_code(status)


def cmd_jobs(args) -> int:
    try:
        client = make_client(args.address, args.token_file)
        try:
            return _JOB_ACTIONS[args.action](client, args)
        except SubmitError:
            raise
        except Exception as e:  # unknown job id, server errors
            raise SubmitError(f"jobs {args.action}: {_first_lines(e)}") from None
    except SubmitError as e:
        return _error(str(e), 1)


def _jobs_list(client, args) -> int:
    jobs = [j for j in client.list_jobs() if j.submission_id]  # drivers that joined on their own have no submission id
    jobs.sort(key=lambda j: j.start_time or 0)
    rows = [("SUBMISSION ID", "STATUS", "STARTED", "ENTRYPOINT")]
    for j in jobs:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j.start_time / 1000)) if j.start_time else "-"
        entry = j.entrypoint if len(j.entrypoint) <= 80 else j.entrypoint[:77] + "..."
        rows.append((j.submission_id, str(j.status), started, entry))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3])
    return 0


def _jobs_logs(client, args) -> int:
    if args.follow:
        status = follow(client, args.job_id)
        print(f"[patchflow] job {args.job_id}: {status}")
        return _exit_code(status)
    sys.stdout.write(client.get_job_logs(args.job_id))
    return 0


def _jobs_status(client, args) -> int:
    info = client.get_job_info(args.job_id)
    print(f"{args.job_id}: {info.status}" + (f" ({info.message})" if info.message else ""))
    return 0


def _jobs_stop(client, args) -> int:
    requested = client.stop_job(args.job_id)
    if not requested:
        print(f"[patchflow] {args.job_id} had already ended: {client.get_job_status(args.job_id)}")
        return 0
    if not args.wait:
        print(f"[patchflow] stop requested for {args.job_id}")
        return 0
    status = wait_terminal(client, args.job_id, timeout_s=args.timeout)
    print(f"[patchflow] {args.job_id}: {status}")
    return 0 if status in ("STOPPED", "SUCCEEDED", "FAILED") else 1


_JOB_ACTIONS = {"list": _jobs_list, "logs": _jobs_logs, "status": _jobs_status, "stop": _jobs_stop}


# ----------------------------------------------------------------------------- argparse

def _connection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="Ray Jobs API (dashboard) URL, e.g. http://HEAD:8265; "
                   "default $RAY_API_SERVER_ADDRESS, or $RAY_ADDRESS when it is an http(s) URL")
    p.add_argument("--token-file", help="file holding the cluster's Ray auth token (default: $RAY_AUTH_TOKEN, "
                   "then the file in $RAY_AUTH_TOKEN_PATH)")


def add_parsers(subparsers) -> None:
    """Register ``submit`` and ``jobs`` on the ``patchflow`` command's subparsers."""
    submit = subparsers.add_parser("submit", help="run a step on a Ray cluster as a Ray Job",
                                   description="Submit a patchflow step as a Ray Job. Arguments after -- go to the step.")
    steps = submit.add_subparsers(dest="step", required=True, metavar="{shards,train,sweep,promote}")
    for step in STEPS:
        p = steps.add_parser(step, help=f"submit `patchflow {step} ...`")
        _connection_args(p)
        p.add_argument("--config", type=Path, help="YAML config (train, sweep): validated here, then again on the cluster")
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. train.epochs=5")
        p.add_argument("--wait", action="store_true", help="follow the logs; exit 0 if the job SUCCEEDED, 1 otherwise")
        p.add_argument("--no-validate", action="store_true", help="skip the local config check (the job still checks)")
        p.add_argument("--image-install", action="store_true",
                       help="upload no working_dir: run `python -m pipeline.cli` from the cluster image's installed package")
        p.add_argument("--tracking-uri", help="MLflow tracking URI for the job (default: $MLFLOW_TRACKING_URI here)")
        p.add_argument("--no-forward-env", action="store_true",
                       help="forward none of this machine's MLflow / AWS / RAY_STORAGE* variables (the cluster's own apply)")
        p.add_argument("--env", action="append", metavar="KEY[=VALUE]", help="extra env var for the job (KEY alone copies it from here)")
        p.add_argument("--submission-id", help="job id to use (default patchflow-<step>-<time>-<random>)")
        p.add_argument("--entrypoint-num-cpus", type=float, default=None, help="CPUs reserved for the job's driver (default 0)")
        p.add_argument("extra", nargs=argparse.REMAINDER, help="-- then arguments for the step")
        p.set_defaults(func=cmd_submit)

    jobs = subparsers.add_parser("jobs", help="list, follow and stop Ray Jobs on a cluster")
    actions = jobs.add_subparsers(dest="action", required=True)
    p = actions.add_parser("list", help="submitted jobs and their status")
    _connection_args(p)
    p = actions.add_parser("logs", help="print (or --follow) a job's logs")
    p.add_argument("job_id")
    p.add_argument("--follow", "-f", action="store_true", help="stream until the job ends; exit 0 if it SUCCEEDED")
    _connection_args(p)
    p = actions.add_parser("status", help="a job's status")
    p.add_argument("job_id")
    _connection_args(p)
    p = actions.add_parser("stop", help="stop a running job")
    p.add_argument("job_id")
    p.add_argument("--wait", action="store_true", help="wait until the job has ended")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds --wait waits (default 60)")
    _connection_args(p)
    for action in actions.choices.values():
        action.set_defaults(func=cmd_jobs)


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.submit submit ... | jobs ...`` (the same commands as ``patchflow``)."""
    parser = argparse.ArgumentParser(prog="patchflow", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
