"""MLflow plumbing: where runs go, and logging that never takes a training run down.

Train V2 rejects Ray's ``MLflowLoggerCallback``, so rank 0 logs through an ``MlflowClient``
bound to an explicit run id (no global "active run" state inside Ray workers). The run id
travels in every checkpoint, so a restarted worker logs into the same run.

Nothing is lost around an outage: what a run could not send by its end (after a bounded retry) is
written to a pending file (``mlflow-pending-<run id>-<n>.json``) beside the run's checkpoints;
``sync_pending`` (the next ``patchflow train`` / ``sweep`` on that storage, or ``patchflow sync``)
sends it. Epoch metrics are sent at most once per step (``RunLogger.metrics(..., once_key=...)``),
checked against the run's history when they are sent, so neither a restart nor a re-sent file
logs an epoch twice, whatever the server answered in between.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

log = logging.getLogger(__name__)

SQLITE = "sqlite:///"  # a SQLite store's URI prefix; the path follows it


def resolve_tracking_uri(configured: str | None = None) -> str:
    """Config value, else $MLFLOW_TRACKING_URI, else a SQLite file in the working directory
    (a database-backed store: the model registry needs one)."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return f"{SQLITE}{Path.cwd().resolve() / 'mlflow.db'}"
    # MLflow reads sqlite:///mlflow.db relative to each process's working directory, and Ray's workers
    # run elsewhere: made absolute here, on the driver, it names one database everywhere.
    db = uri[len(SQLITE):] if uri.startswith(SQLITE) else None
    if db and db != ":memory:" and not Path(db).is_absolute():
        return f"{SQLITE}{Path(db).resolve()}"
    return uri


def default_artifact_root(tracking_uri: str) -> str | None:
    """Local stores get an absolute artifact folder beside the database (``tracking_uri`` as
    ``resolve_tracking_uri`` gives it); servers choose their own."""
    if tracking_uri.startswith(SQLITE):
        return (Path(tracking_uri[len(SQLITE):]).parent / "mlartifacts").as_uri()
    return None


def get_or_create_experiment(client: MlflowClient, name: str) -> str:
    """Experiments are created up front, by the driver, with an absolute artifact location:
    concurrent creation from trials races."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        artifact_root = default_artifact_root(client.tracking_uri)
        location = f"{artifact_root}/{name}" if artifact_root else None
        return client.create_experiment(name, artifact_location=location)
    except mlflow.exceptions.MlflowException:
        exp = client.get_experiment_by_name(name)  # created meanwhile by another process
        if exp is None:
            raise
        return exp.experiment_id


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = str(value)
    return out


class TrackingError(RuntimeError):
    """The tracking server refused or could not answer a call the command cannot go on without."""


T = TypeVar("T")


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def guarded(what: str, call: Callable[[], T], default: T | None = None) -> T | None:
    """``call()``, or ``default`` with a warning when MLflow fails: for the calls a finished piece of
    work must not die on (a server that blinks after training must not turn success into a traceback)."""
    try:
        return call()
    except Exception as e:  # noqa: BLE001 - any transport or server error
        log.warning("MLflow: %s failed; going on without it (%s)", what, first_line(e))
        return default


# One queued call: {"metrics": [[key, value, timestamp_ms, step], ...]} | {"params": [[key, value], ...]} |
# {"tags": [[key, value], ...]}, optionally with "once": [key, step] (see RunLogger.metrics). Plain JSON,
# so that the queue can be written to a pending file as it is.
Entry = dict[str, Any]


def _entities(entry: Entry) -> dict[str, list]:
    return {
        "metrics": [Metric(k, float(v), int(t), int(s)) for k, v, t, s in entry.get("metrics", [])],
        "params": [Param(k, str(v)) for k, v in entry.get("params", [])],
        "tags": [RunTag(k, str(v)) for k, v in entry.get("tags", [])],
    }


class RunLogger:
    """Logs to one MLflow run by id; tracking failures are warned about, never raised.

    While the server is unreachable, calls queue in memory and are not retried for ``cooldown_s``
    (a dead server must not stall every epoch on HTTP retries); the next successful call sends the
    backlog, so the run catches up with no gap. ``close`` flushes with a bounded retry and writes
    what is still queued to a pending file.
    """

    def __init__(self, tracking_uri: str, run_id: str | None, cooldown_s: float = 60.0) -> None:
        # Fail fast inside training processes: MLflow's default retries back off for minutes.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri)
        self.run_id = run_id
        self.cooldown_s = cooldown_s
        self._backlog: list[Entry] = []
        self._down_since: float | None = None
        self._steps: dict[str, set[int]] = {}  # steps of a key known to be in the run (read once, then kept)

    def _send_one(self, entry: Entry) -> None:
        once = entry.get("once")
        if once is not None:
            key, step = once
            if key not in self._steps:  # asked of the server itself: "unreachable" never reads as "none logged"
                self._steps[key] = {m.step for m in self.client.get_metric_history(self.run_id, key)}
            if step in self._steps[key]:
                return  # in the run already: a re-run epoch, a re-sent pending file, a checkpoint's carried copy
        self.client.log_batch(self.run_id, **_entities(entry))
        if once is not None:
            self._steps[once[0]].add(once[1])

    def _drain(self) -> bool:
        """Send the backlog in order; False (and the rest kept) at the first failure."""
        try:
            while self._backlog:
                self._send_one(self._backlog[0])
                self._backlog.pop(0)
        except Exception as e:  # tracking must never crash training
            if self._down_since is None:
                log.warning("MLflow logging to run %s failed; training continues and %d call(s) are queued "
                            "until the server answers: %s", self.run_id, len(self._backlog), first_line(e))
            self._down_since = time.monotonic()
            return False
        if self._down_since is not None:
            log.warning("MLflow reachable again: run %s caught up", self.run_id)
            self._down_since = None
        return True

    def _send(self, entry: Entry) -> None:
        if self.run_id is None:
            return
        self._backlog.append(entry)
        if self._down_since is not None and time.monotonic() - self._down_since < self.cooldown_s:
            return
        self._drain()

    @property
    def pending(self) -> int:
        return len(self._backlog)

    def metrics(self, metrics: dict[str, Any], step: int, *, once_key: str | None = None) -> None:
        """Log the numeric entries of ``metrics`` at ``step``. With ``once_key``, the whole batch is
        skipped when the run already has a point of ``once_key`` at ``step`` (an epoch is logged once)."""
        now = int(time.time() * 1000)
        entry: Entry = {"metrics": [[k, float(v), now, int(step)] for k, v in metrics.items()
                                    if isinstance(v, (int, float)) and not isinstance(v, bool)]}
        if once_key is not None:
            entry["once"] = [once_key, int(step)]
        self._send(entry)

    def params(self, params: dict[str, Any]) -> None:
        self._send({"params": [[k, v[:6000]] for k, v in flatten(params).items()]})

    def tags(self, tags: dict[str, str]) -> None:
        self._send({"tags": [[k, str(v)] for k, v in tags.items()]})

    def flush(self, attempts: int = 3, wait_s: float = 1.0) -> int:
        """Try to send the backlog up to ``attempts`` times (waits ``wait_s``, then doubling, between
        tries; the cooldown does not apply). Returns the number of calls still queued."""
        for attempt in range(attempts):
            if self.run_id is None or self._drain():
                return 0
            if attempt + 1 < attempts:
                time.sleep(wait_s * 2**attempt)
        return len(self._backlog)

    def close(self, pending_dir: str | None, attempts: int = 3, wait_s: float = 1.0) -> str | None:
        """End of the run: ``flush``, then write what is left to a pending file in ``pending_dir``
        (the run's checkpoint folder) and warn naming it. Returns that file, or None when all was sent."""
        if self.flush(attempts, wait_s) == 0 or pending_dir is None:
            return None
        path = write_pending(pending_dir, self.tracking_uri, self.run_id, self._backlog)
        log.warning("MLflow unreachable at the end of run %s: %d call(s) saved to %s; the next patchflow train or "
                    "sweep on this storage sends them, or run: patchflow sync --storage %s",
                    self.run_id, len(self._backlog), path, pending_dir.rstrip("/").rsplit("/", 1)[0])
        self._backlog = []
        return path


# ---- pending files: what a run could not send -------------------------------------------------------

PENDING_PREFIX = "mlflow-pending-"
STATUSES = ("FINISHED", "FAILED", "KILLED")
_RUN_ID = re.compile(r"^[0-9a-zA-Z_-]{1,64}$")


def _fs(directory: str):
    import fsspec

    return fsspec.core.url_to_fs(directory)


def write_pending(directory: str, tracking_uri: str, run_id: str, entries: list[Entry], status: str | None = None) -> str:
    """Write one pending file into ``directory`` (local, or any fsspec URL such as s3://); returns its path."""
    fs, root = _fs(directory)
    fs.makedirs(root, exist_ok=True)
    path = f"{root.rstrip('/')}/{PENDING_PREFIX}{run_id}-{uuid.uuid4().hex[:8]}.json"
    with fs.open(path, "w") as f:
        json.dump({"tracking_uri": tracking_uri, "run_id": run_id, "entries": entries, "status": status}, f)
    return fs.unstrip_protocol(path) if "://" in directory else path


def finish_run(client: MlflowClient, run_id: str, status: str, pending_dir: str | None) -> str | None:
    """``set_terminated`` that never raises: when MLflow cannot be reached the status goes to a pending
    file in ``pending_dir`` (returned), for ``sync_pending`` to set later."""
    try:
        client.set_terminated(run_id, status)
        return None
    except Exception as e:  # noqa: BLE001
        if pending_dir is None:
            log.warning("MLflow: could not mark run %s %s (%s)", run_id, status, first_line(e))
            return None
        path = write_pending(pending_dir, client.tracking_uri, run_id, [], status)
        log.warning("MLflow: could not mark run %s %s (%s); saved to %s for patchflow sync", run_id, status,
                    first_line(e), path)
        return path


def _check_pending(path: str, raw: Any) -> dict:
    """A pending file comes from shared storage: plain JSON of the expected shape, or ValueError."""
    def bad(what: str) -> ValueError:
        return ValueError(f"{path}: not a patchflow pending file ({what})")

    if not isinstance(raw, dict) or not isinstance(raw.get("tracking_uri"), str):
        raise bad("expected an object with tracking_uri, run_id, entries, status")
    if not isinstance(raw.get("run_id"), str) or not _RUN_ID.match(raw["run_id"]):
        raise bad(f"run_id {raw.get('run_id')!r}")
    if raw.get("status") not in (None, *STATUSES):
        raise bad(f"status {raw.get('status')!r}")
    entries = raw.get("entries")
    if not isinstance(entries, list):
        raise bad("entries must be a list")
    number = (int, float)
    for entry in entries:
        if not isinstance(entry, dict) or not set(entry) <= {"metrics", "params", "tags", "once"}:
            raise bad(f"entry {entry!r:.80}")
        for m in entry.get("metrics", []):
            if not (isinstance(m, list) and len(m) == 4 and isinstance(m[0], str) and isinstance(m[1], number)
                    and isinstance(m[2], int) and isinstance(m[3], int)):
                raise bad(f"metric {m!r:.80}")
        for kind in ("params", "tags"):
            if any(not (isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p)) for p in entry.get(kind, [])):
                raise bad(f"{kind} of entry {entry!r:.80}")
        once = entry.get("once")
        if once is not None and not (isinstance(once, list) and len(once) == 2 and isinstance(once[0], str) and isinstance(once[1], int)):
            raise bad(f"once {once!r}")
    return raw


def pending_files(storage: str) -> list[str]:
    """Pending files in ``storage`` and in its run folders (one level down)."""
    fs, root = _fs(storage)
    if not fs.isdir(root):
        return []
    root = root.rstrip("/")
    found = sorted(set(fs.glob(f"{root}/{PENDING_PREFIX}*.json")) | set(fs.glob(f"{root}/*/{PENDING_PREFIX}*.json")))
    return [fs.unstrip_protocol(p) if "://" in storage else p for p in found]


@dataclass
class SyncResult:
    sent: list[str] = field(default_factory=list)  # files fully sent (and removed)
    left: list[str] = field(default_factory=list)  # files kept: the server did not answer
    skipped: list[str] = field(default_factory=list)  # files for another tracking server, or unreadable


def sync_pending(storage: str, tracking_uri: str | None = None) -> SyncResult:
    """Send the pending files under ``storage`` to ``tracking_uri`` (default: ``resolve_tracking_uri``)
    and remove each one once it is sent; a file that cannot be sent (yet) is kept with what is left.

    A file recorded for another tracking server is skipped, never sent there: the file comes from
    shared storage, and following its URI would hand this process's MLflow credentials to whatever
    server it names."""
    uri = resolve_tracking_uri(tracking_uri)
    result = SyncResult()
    files = pending_files(storage)
    parsed = []
    for path in files:
        fs, p = _fs(path)
        try:
            with fs.open(p) as f:
                parsed.append((path, fs, p, _check_pending(path, json.load(f))))
        except (ValueError, OSError) as e:  # json.JSONDecodeError is a ValueError
            log.warning("MLflow sync: skipping %s: %s", path, first_line(e))
            result.skipped.append(path)
    # a run's metrics before its final status (the driver writes the status after its workers' files)
    parsed.sort(key=lambda item: (item[3]["status"] is not None, item[0]))
    for path, fs, p, data in parsed:
        if data["tracking_uri"] != uri:
            log.warning("MLflow sync: %s is for %s, this command logs to %s: left as it is (run patchflow sync with "
                        "MLFLOW_TRACKING_URI=%s to send it)", path, data["tracking_uri"], uri, data["tracking_uri"])
            result.skipped.append(path)
            continue
        logger = RunLogger(uri, data["run_id"], cooldown_s=0)
        logger._backlog = list(data["entries"])
        status = data["status"]
        if logger.flush(attempts=1) == 0 and status is not None:
            try:
                logger.client.set_terminated(data["run_id"], status)
                status = None
            except Exception as e:  # noqa: BLE001
                log.warning("MLflow sync: could not mark run %s %s (%s)", data["run_id"], status, first_line(e))
        if not logger._backlog and status is None:
            fs.rm(p)
            result.sent.append(path)
        else:
            with fs.open(p, "w") as f:
                json.dump({**data, "entries": logger._backlog, "status": status}, f)
            result.left.append(path)
    return result
