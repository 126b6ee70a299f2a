"""MLflow tracking: the only module that imports mlflow.

Store: `--tracking-uri` > `MLFLOW_TRACKING_URI` > `sqlite:///mlruns/mlflow.db` (artifacts under
`mlruns/artifacts`). Runs are created through `start_run`, which always ends them: FINISHED on
success, FAILED on an error, KILLED on Ctrl-C or SIGTERM — never left RUNNING. While open, a run's
heartbeat tag says its process is alive, so a run whose process died outright, on any host, is
recognised and ended FAILED later (`fail_stale_runs`).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

from mlflow import MlflowClient
from mlflow.data.code_dataset_source import CodeDatasetSource
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from sqlalchemy.exc import SQLAlchemyError

import cps
from cps.errors import CpsError, first_line
from cps.paths import file_lock

if TYPE_CHECKING:
    import polars as pl

log = logging.getLogger(__name__)

DEFAULT_URI = "sqlite:///mlruns/mlflow.db"
DEFAULT_EXPERIMENT = "cps"
STAGE_TAG = "cps.stage"
STAGES = ("calibrate", "prune", "eval", "analyze", "sweep")
_PARAM_MAX = 6000  # MLflow's limit on a param value
HEARTBEAT_TAG = "cps.heartbeat"
HEARTBEAT_S = 60.0  # how often an open run says that its process is alive
# Missed heartbeats after which another host's run is taken for dead: a slow store or a busy
# interpreter delays a beat, never five.
STALE_AFTER_BEATS = 5
STOP_WAIT_S = 30.0  # the longest a run's end waits for a heartbeat write under way


@dataclass(frozen=True)
class Store:
    """Which tracking store and experiment to use."""

    uri: str | None = None
    experiment: str = DEFAULT_EXPERIMENT

    @property
    def resolved_uri(self) -> str:
        uri = self.uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            # Relative to the working directory; made absolute so the store is the same everywhere.
            uri = "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
        return uri


@dataclass
class RunRecord:
    """A run read back from the store."""

    run_id: str
    status: str
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]
    artifact_uri: str
    start_time: int
    experiment_id: str

    @property
    def stage(self) -> str | None:
        return self.tags.get(STAGE_TAG)


# ---------------------------------------------------------------------------------------------
# Connecting


def _quiet_mlflow() -> None:
    for name in ("mlflow", "alembic", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # stdout is the result


def _check_reachable(uri: str) -> None:
    """Fail fast with one line instead of MLflow's minutes of retries."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as reply:
                reply.read()
        except (urllib.error.URLError, OSError, ValueError) as error:
            reason = getattr(error, "reason", error)
            raise CpsError(f"tracking store {uri} is unreachable: {reason}") from None
    elif uri.startswith(("postgresql", "mysql", "mssql")):
        # A database server: MLflow would retry for minutes; one TCP connect says it at once.
        parsed = urlparse(uri)
        default_port = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}
        port = parsed.port or default_port[parsed.scheme.split("+")[0]]
        try:
            socket.create_connection((parsed.hostname or "localhost", port), timeout=5).close()
        except OSError as error:
            raise CpsError(
                f"tracking store {_redacted(uri)} is unreachable: {error.strerror or error}"
            ) from None
    elif uri.startswith("sqlite:///"):
        db_path = Path(uri.removeprefix("sqlite:///"))
        try:
            db_path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise CpsError(f"tracking store {uri}: cannot create {db_path.parent}: {error}") from None
    elif uri.startswith("file:") or "://" not in uri:
        folder = Path(uri.removeprefix("file://").removeprefix("file:"))
        if folder.exists() and not folder.is_dir():
            raise CpsError(f"tracking store {uri} is not a folder")


def artifact_root(uri: str) -> str | None:
    """For a local sqlite store, artifacts live beside the database (`mlruns/artifacts`)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").resolve().as_uri()
    return None


@lru_cache(maxsize=8)
def _client_for(uri: str) -> MlflowClient:
    _check_reachable(uri)

    _quiet_mlflow()  # after the import: mlflow configures its loggers when imported

    try:
        with _creation_lock(uri):
            client = MlflowClient(tracking_uri=uri)
            client.search_experiments(max_results=1)  # touches the store: migrations, connection
    except (MlflowException, SQLAlchemyError) as error:
        raise CpsError(f"tracking store {_redacted(uri)} is unusable: {first_line(error)}") from None
    return client


def _redacted(uri: str) -> str:
    """A database URI without its password (it may be printed or logged)."""
    parsed = urlparse(uri)
    if parsed.password:
        return uri.replace(f":{parsed.password}@", ":***@")
    return uri


@contextmanager
def _creation_lock(uri: str) -> Iterator[None]:
    """For a SQLite store, a lock file beside the database: processes started at once on a new
    store would otherwise all run MLflow's schema migration and all but one die in it."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    database = Path(uri.removeprefix("sqlite:///"))
    with file_lock(database.with_name(database.name + ".lock")):
        yield


def client(store: Store) -> MlflowClient:
    return _client_for(store.resolved_uri)


# MLflow 3's UI opens an experiment on the page its kind names: without the tag, on the GenAI
# overview (traces, token usage); a model-training experiment opens on its runs table.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
NOTE_TAG = "mlflow.note.content"  # the run's description: the UI shows it on the run's page


def experiment_id(store: Store, create: bool = True) -> str | None:
    mlflow_client = client(store)
    experiment = mlflow_client.get_experiment_by_name(store.experiment)
    if experiment is not None:
        if create and experiment.tags.get(EXPERIMENT_KIND_TAG) is None:  # made by an older cps
            mlflow_client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return experiment.experiment_id
    if not create:
        return None
    try:
        return mlflow_client.create_experiment(
            store.experiment,
            artifact_location=artifact_root(store.resolved_uri),
            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
        )
    except MlflowException:  # created meanwhile by another process
        experiment = mlflow_client.get_experiment_by_name(store.experiment)
        if experiment is None:
            raise
        return experiment.experiment_id


# ---------------------------------------------------------------------------------------------
# Provenance


@lru_cache(maxsize=1)
def git_sha() -> str:
    """Commit of the cps source tree (with -dirty for uncommitted changes), or 'unknown'."""
    source = Path(cps.__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        if sha.returncode != 0:
            return "unknown"
        dirty = subprocess.run(
            ["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance_params() -> dict[str, str]:
    return {"cps_version": cps.__version__, "git_sha": git_sha()}


def library_tags() -> dict[str, str]:
    tags = {}
    for package in ("torch", "transformers", "lm_eval", "mlflow"):
        try:
            tags[f"cps.version.{package}"] = importlib.metadata.version(package.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            tags[f"cps.version.{package}"] = "not installed"
    return tags


# ---------------------------------------------------------------------------------------------
# Writing


@dataclass
class TrackedRun:
    """A run being written. Created by `start_run`; its methods write straight to the store."""

    run_id: str
    store: Store
    _client: Any = field(repr=False)

    def log_params(self, params: Mapping[str, Any]) -> None:

        items = [Param(k, str(v)[:_PARAM_MAX]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self._client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for start in range(0, len(items), 1000):
            self._client.log_batch(self.run_id, metrics=items[start : start + 1000])

    def log_series(self, name: str, values: list[float]) -> None:
        """A per-layer series: one point per step (= layer index)."""

        now = int(time.time() * 1000)
        items = [Metric(name, float(v), now, step) for step, v in enumerate(values)]
        for start in range(0, len(items), 1000):
            self._client.log_batch(self.run_id, metrics=items[start : start + 1000])

    def set_tags(self, tags: Mapping[str, Any]) -> None:

        self._client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(local_path)
        if path.is_dir():
            self._client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self._client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, name: str) -> None:
        """A text file `<name>` in the run's artifacts."""
        self._client.log_text(self.run_id, text, name)

    def log_frame(self, frame: pl.DataFrame, name: str) -> None:
        """A polars frame as `<name>` (parquet) in the run's artifacts."""
        self.log_frames({name: frame})

    def log_frames(self, frames: Mapping[str, pl.DataFrame]) -> None:
        """Polars frames as parquet artifacts (`name` may hold folders: `items/sib_sw.parquet`)."""
        if not frames:
            return
        with tempfile.TemporaryDirectory() as folder:
            for name, frame in frames.items():
                path = Path(folder) / name
                path.parent.mkdir(parents=True, exist_ok=True)
                frame.write_parquet(path)
            self._client.log_artifacts(self.run_id, folder)


@dataclass(frozen=True)
class DatasetRecord:
    """Text a run used, as an MLflow dataset input (the UI's Dataset column): `context` is
    calibration or evaluation; `digest` identifies exactly the tokens used."""

    name: str  # <corpus>:<language or mixture>
    digest: str
    source: str  # the corpus folder (or the hub / a description when it is not on this machine)
    context: str
    profile: Mapping[str, Any] = field(default_factory=dict)


def log_datasets(run: TrackedRun, datasets: list[DatasetRecord]) -> None:

    entries = []
    for record in datasets:
        source: Any
        if Path(record.source).is_absolute() and Path(record.source).exists():
            with warnings.catch_warnings():  # "can be interpreted in multiple ways": a local folder
                warnings.simplefilter("ignore")
                source = resolve_dataset_source(record.source)
        else:
            source = CodeDatasetSource({"cps.source": record.source})
        meta = MetaDataset(source, name=record.name, digest=record.digest)._to_mlflow_entity()
        dataset = Dataset(
            record.name,
            record.digest,
            meta.source_type,
            meta.source,
            profile=json.dumps(dict(record.profile)),
        )
        entries.append(DatasetInput(dataset, tags=[InputTag("mlflow.data.context", record.context)]))
    for attempt in range(3):
        try:
            if entries:
                run._client.log_inputs(run.run_id, datasets=entries)
            return
        except (MlflowException, SQLAlchemyError):
            # MLflow's SQL store checks for the dataset, then inserts it: two processes logging the
            # same text at once collide on its unique key; the retry finds the winner's row.
            if attempt == 2:
                raise
            time.sleep(0.2 * (attempt + 1))


def log_transformers_model(
    run: TrackedRun, model: Any, tokenizer: Any, name: str = "model", checkpoint: Path | None = None
) -> str:
    """The model as an MLflow model of the run (transformers flavor, the UI's Models column):
    `mlflow.transformers.load_model("runs:/<run>/model")` loads it, `mlflow.register_model`
    registers it; its `model/` folder loads with `from_pretrained`. Returns the model id.
    With `checkpoint`, the model is that folder (a streamed prune's shards and its tokenizer's
    files: never whole in memory), copied as it is; `model` is then its skeleton.
    What is written is checked against `model` (`models.check_saved`) before the model is READY.

    A store that keeps artifacts on this machine gets the model written in place: MLflow's own
    `log_model` writes it to a temporary folder and then copies it into the store (Gemma-3 270M:
    1 GB written twice, ~2 s; an 8B model: 16 GB, and as much room in the temporary folder). The
    model is the same either way: a logged model linked to the run and its metrics, READY once
    written (FAILED, its files removed, when writing fails). Other stores take `log_model`."""
    import mlflow
    import mlflow.transformers  # imports transformers pipelines: only runs that save a model pay
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model

    from cps.models import check_saved  # torch and transformers: only runs that save a model pay

    versions = library_tags()
    options: dict[str, Any] = {
        "task": "text-generation",
        "pip_requirements": [
            f"{package}=={versions[f'cps.version.{package}']}" for package in ("torch", "transformers")
        ],
    }
    if checkpoint and "quantization_config" in (checkpoint / "config.json").read_text(encoding="utf-8"):
        from importlib.metadata import version  # a compressed-tensors checkpoint loads only with it

        options["pip_requirements"].append(f"compressed-tensors=={version('compressed-tensors')}")
    components: Any = str(checkpoint) if checkpoint else {"model": model, "tokenizer": tokenizer}
    experiment = experiment_id(run.store)
    mlflow.set_tracking_uri(run.store.resolved_uri)
    mlflow.set_experiment(experiment_id=experiment)
    logging.getLogger("mlflow.transformers").setLevel(logging.ERROR)  # no hub model card offline
    logged = mlflow.initialize_logged_model(name=name, source_run_id=run.run_id, experiment_id=experiment)
    if not logged.artifact_location.startswith("file:"):
        if checkpoint:
            check_saved(f"run {run.run_id}'s model ({checkpoint})", checkpoint, model)
        with _pipeline_classes_resolved():
            info = mlflow.transformers.log_model(
                transformers_model=components,
                name=name,
                run_id=run.run_id,
                model_id=logged.model_id,
                **options,
            )
        return str(info.model_id)
    folder = _file_path(logged.artifact_location)
    try:
        run._client.log_outputs(run.run_id, [LoggedModelOutput(logged.model_id, step=0)])
        described = Model(
            artifact_path=logged.artifact_location,
            model_uuid=logged.model_id,
            run_id=run.run_id,
            model_id=logged.model_id,
        )
        with _pipeline_classes_resolved():
            mlflow.transformers.save_model(
                transformers_model=components, path=str(folder), mlflow_model=described, **options
            )
        check_saved(f"run {run.run_id}'s logged model ({folder / 'model'})", folder / "model", model)
        _link_metrics(run, logged.model_id)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        mlflow.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    mlflow.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    return str(logged.model_id)


@contextmanager
def _pipeline_classes_resolved() -> Iterator[None]:
    """While inside, transformers' `pipelines.check_task` names each pipeline by its class: MLflow
    (3.17) reads `check_task(task)[1]["impl"].__name__` when it saves a model from a checkpoint
    folder, where transformers 5 gives the class's dotted path as a string. Nothing changes where
    it is a class already."""
    from transformers import pipelines

    original = pipelines.check_task

    def check_task(task: str) -> Any:
        normalized, targeted, options = original(task)
        if isinstance(targeted.get("impl"), str):
            module, _, name = targeted["impl"].rpartition(".")
            targeted = {**targeted, "impl": getattr(importlib.import_module(module), name)}
        return normalized, targeted, options

    pipelines.check_task = check_task
    try:
        yield
    finally:
        pipelines.check_task = original


def _link_metrics(run: TrackedRun, model_id: str) -> None:
    """The run's metrics so far as the logged model's too (the UI's Models tab shows them), as
    MLflow's `log_model` links them: every metric of step 0 not yet linked to a model."""
    metrics = []
    for key in run._client.get_run(run.run_id).data.metrics:
        metrics += [
            Metric(m.key, m.value, m.timestamp, m.step, model_id=model_id, run_id=run.run_id)
            for m in run._client.get_metric_history(run.run_id, key)
            if m.step == 0 and m.model_id is None
        ]
    if metrics:
        run._client.log_batch(run.run_id, metrics=metrics)


def logged_model_folder(store: Store, run_id: str, scratch: str | Path, name: str = "model") -> Path | None:
    """The `from_pretrained` folder of the run's logged model `name` (in place when the store
    keeps artifacts on this machine, else downloaded into `scratch`); None when it has none."""
    record = get_run(store, run_id)
    found = client(store).search_logged_models(
        experiment_ids=[record.experiment_id],
        filter_string=f"source_run_id = '{_quote(run_id)}' AND name = '{_quote(name)}'",
        max_results=1,
    )
    if not found:
        return None
    location = found[0].artifact_location
    if location.startswith("file:"):
        return _on_this_machine(location, "model")
    import mlflow.artifacts

    try:
        return Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"{location.rstrip('/')}/model",
                dst_path=str(scratch),
                tracking_uri=store.resolved_uri,
            )
        )
    except (MlflowException, OSError):
        return None


@contextmanager
def start_run(
    store: Store,
    stage: str,
    params: Mapping[str, Any],
    run_name: str | None = None,
    tags: Mapping[str, Any] | None = None,
) -> Iterator[TrackedRun]:
    """Create a run with `cps.stage`, params and provenance; end it FINISHED, FAILED or KILLED.

    Every run records the host and process that wrote it (`cps.host`, `cps.pid`) and, while it is
    open, a heartbeat (`cps.heartbeat`), so a run left RUNNING by a process that was killed outright
    can be recognised later (`fail_stale_runs`).
    """
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}")
    mlflow_client = client(store)
    all_tags = {STAGE_TAG: stage, **library_tags(), **_process_tags(), **(tags or {})}
    run = mlflow_client.create_run(
        experiment_id(store), tags={k: str(v) for k, v in all_tags.items()}, run_name=run_name
    )
    tracked = TrackedRun(run.info.run_id, store, mlflow_client)
    with _ending(tracked):
        tracked.log_params({**params, **provenance_params()})
        yield tracked


@contextmanager
def resume_run(store: Store, run_id: str) -> Iterator[TrackedRun]:
    """Set an ended run RUNNING again (a resumed sweep's parent) and end it like `start_run`."""
    get_run(store, run_id)
    mlflow_client = client(store)
    mlflow_client.update_run(run_id, status="RUNNING")
    tracked = TrackedRun(run_id, store, mlflow_client)
    tracked.set_tags(_process_tags())
    with _ending(tracked):
        yield tracked


@contextmanager
def _ending(tracked: TrackedRun) -> Iterator[None]:
    """The run's heartbeat while it is open; then its end, after the heartbeat's last write."""
    status = "FAILED"
    heartbeat = _Heartbeat(tracked)
    try:
        heartbeat.start()
        yield
        status = "FINISHED"
    except (KeyboardInterrupt, SystemExit):
        status = "KILLED"
        raise
    finally:
        try:
            heartbeat.stop()
        finally:
            tracked._client.set_terminated(tracked.run_id, status=status)


class _Heartbeat:
    """A daemon thread that sets `cps.heartbeat` (unix seconds) on an open run every `HEARTBEAT_S`:
    a process on another host cannot look up the run's pid, so it reads this (`fail_stale_runs`).

    Lifecycle: started once the run exists (`_ending`); `stop` wakes it and waits for a write under way,
    so nothing is written once the run has ended. A failed write is logged at debug and the next
    one tried: the heartbeat never ends a run. Daemon: it never keeps a process alive."""

    def __init__(self, tracked: TrackedRun) -> None:
        self._tracked = tracked
        self._stopped = threading.Event()
        name = f"cps-heartbeat-{tracked.run_id}"
        self._thread = threading.Thread(target=self._beat, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _beat(self) -> None:
        while not self._stopped.wait(HEARTBEAT_S):
            try:
                self._tracked.set_tags(_heartbeat_tag())
            except Exception as error:  # any store error (database, network): the run goes on
                log.debug("heartbeat of run %s not written: %s", self._tracked.run_id, first_line(error))

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.ident is not None:  # started; a write stuck on an unreachable server (its
            self._thread.join(STOP_WAIT_S)  # retries take minutes) does not hold the run's end up


def _heartbeat_tag() -> dict[str, str]:
    return {HEARTBEAT_TAG: f"{time.time():.3f}"}


def _process_tags() -> dict[str, str]:
    return {"cps.host": socket.gethostname(), "cps.pid": str(os.getpid()), **_heartbeat_tag()}


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def fail_stale_runs(store: Store) -> list[str]:
    """End as FAILED the RUNNING runs whose writing process is gone (killed with SIGKILL, out of
    memory, power loss, its node lost): on this host, its pid no longer exists; on another host
    (a Ray worker's node), its heartbeat is older than `STALE_AFTER_BEATS` x `HEARTBEAT_S` (a run
    without one: its start). Runs of live processes, and runs that are no cps run's (no
    `cps.host`), are left alone. Returns the ids it ended."""
    host, now = socket.gethostname(), time.time()
    ended = []
    for record in find_runs(store, status="RUNNING"):
        reason = _stale_reason(record, host, now)
        if reason is None:
            continue
        client(store).set_terminated(record.run_id, status="FAILED")
        open_run(store, record.run_id).set_tags({"cps.failure": reason})
        ended.append(record.run_id)
    return ended


def _stale_reason(record: RunRecord, host: str, now: float) -> str | None:
    """Why a RUNNING run's writing process is gone, or None while it may be alive. Another host's
    clock is trusted to within the grace period."""
    writer, pid = record.tags.get("cps.host"), record.tags.get("cps.pid", "")
    if writer is None:
        return None
    if writer == host:
        alive = not pid.isdigit() or _process_alive(int(pid))
        return None if alive else f"process {pid} on {host} died"
    try:
        last = float(record.tags[HEARTBEAT_TAG])
    except (KeyError, ValueError):
        last = record.start_time / 1000
    silent = now - last
    if silent <= STALE_AFTER_BEATS * HEARTBEAT_S:
        return None
    return f"process {pid or '?'} on {writer}: no heartbeat for {silent:.0f} s"


def open_run(store: Store, run_id: str) -> TrackedRun:
    """A handle to write more metrics, tags and artifacts into an existing run (e.g. `cps eval`
    into the prune run it evaluates); its status is left as it is."""
    get_run(store, run_id)
    return TrackedRun(run_id, store, client(store))


def _file_path(uri: str) -> Path:
    """The folder of a `file:` artifact location."""
    return Path(unquote(urlparse(uri).path))


def _on_this_machine(uri: str, path: str) -> Path | None:
    """`path` under an artifact location kept on this machine (`file:`), if it exists there."""
    local = _file_path(uri) / path
    return local if local.exists() else None


def local_artifact_dir(store: Store, run_id: str, path: str) -> Path | None:
    """The artifact's folder itself when the store keeps artifacts on this machine (no copy)."""
    uri = get_run(store, run_id).artifact_uri
    return _on_this_machine(uri, path) if uri.startswith("file:") else None


def artifact_if_any(store: Store, run_id: str, path: str, scratch: str | Path) -> Path | None:
    """The artifact (file or folder): in place when the store keeps artifacts on this machine, else
    downloaded into `scratch`; None when the run has no such artifact."""
    uri = get_run(store, run_id).artifact_uri
    if uri.startswith("file:"):
        return _on_this_machine(uri, path)
    try:
        return download_artifact(store, run_id, path, Path(scratch) / run_id)
    except CpsError:
        return None


# ---------------------------------------------------------------------------------------------
# Reading


def _record(run: Any) -> RunRecord:
    return RunRecord(
        run_id=run.info.run_id,
        status=run.info.status,
        params=dict(run.data.params),
        metrics=dict(run.data.metrics),
        tags=dict(run.data.tags),
        artifact_uri=run.info.artifact_uri,
        start_time=run.info.start_time,
        experiment_id=run.info.experiment_id,
    )


def get_run(store: Store, run_id: str) -> RunRecord:

    mlflow_client = client(store)
    try:
        return _record(mlflow_client.get_run(run_id))
    except MlflowException:
        raise CpsError(f"no run {run_id!r} in tracking store {store.resolved_uri}") from None


def find_runs(
    store: Store,
    stage: str | None = None,
    params: Mapping[str, Any] | None = None,
    status: str | None = "FINISHED",
) -> list[RunRecord]:
    """Runs of the experiment matching stage, exact param values and status; newest first."""
    exp_id = experiment_id(store, create=False)
    if exp_id is None:
        return []
    clauses = []
    if stage:
        clauses.append(f"tags.`{STAGE_TAG}` = '{stage}'")
    for key, value in (params or {}).items():
        clauses.append(f"params.`{key}` = '{_quote(str(value))}'")
    if status:
        clauses.append(f"attributes.status = '{status}'")
    mlflow_client = client(store)
    records, token = [], None
    while True:
        page = mlflow_client.search_runs(
            [exp_id],
            filter_string=" and ".join(clauses),
            max_results=1000,
            order_by=["attributes.start_time DESC"],
            page_token=token,
        )
        records.extend(_record(run) for run in page)
        token = page.token
        if not token:
            return records


def metric_history(store: Store, run_id: str, key: str) -> list[float]:
    """A metric's values in step order (a series of `log_series`: one per layer); a step logged more
    than once keeps its latest value. Empty when the run never logged `key`."""
    latest: dict[int, float] = {}
    for point in sorted(client(store).get_metric_history(run_id, key), key=lambda p: (p.step, p.timestamp)):
        latest[point.step] = point.value
    return [latest[step] for step in sorted(latest)]


def download_artifact(store: Store, run_id: str, path: str, dst: str | Path) -> Path:
    """Copy one artifact (file or folder) of a run to `dst`; CpsError when it is missing."""

    get_run(store, run_id)
    Path(dst).mkdir(parents=True, exist_ok=True)
    try:
        local = client(store).download_artifacts(run_id, path, str(dst))
    except (MlflowException, OSError):
        raise CpsError(f"run {run_id} has no artifact {path!r}") from None
    return Path(local)


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")
