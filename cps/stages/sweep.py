"""`cps sweep STUDY.toml`: every cell of a study's grid, evaluated, then the analyses; resumable.

One parent run (`cps.stage=sweep`, keyed by the study's fingerprint and reused when the same study
runs again) and one child per cell: the cell's prune run, evaluated before it ends, so a cell is
done exactly when its run is FINISHED with the study's evaluation fingerprint. On a rerun, done
cells are skipped; a FINISHED run that lacks the evaluation is only evaluated; failed, killed and
missing cells run again. Runs left RUNNING by a process that died (SIGKILL, out of memory) are
ended FAILED first. A crash inside one cell is recorded in its run and the sweep goes on.

Executors: `local` runs the cells one after another in this process; `ray` runs each cell as a Ray
task (a GPU per cell when the cluster has GPUs), all writing to the same tracking store.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import polars as pl
import torch
from tqdm.auto import tqdm

from cps import tracking
from cps.analysis.groups import comparison_groups
from cps.config import EVAL_FINGERPRINT_TAG, FINDINGS_DELTA_TAG, same_quantization, updates_weights
from cps.errors import CpsError, first_line
from cps.notes import describe
from cps.runs import drop_kept_weights, find_prune_runs, keep_weights
from cps.stages.analyze import analysis_params, analyze_group
from cps.stages.evaluate import run_eval
from cps.stages.prune import run_prune
from cps.study import Cell, Study, check_inputs

log = logging.getLogger(__name__)

DONE, EVALUATE, RUN, RERUN = "done", "evaluate", "run", "rerun"
ACTIONS = {
    DONE: "done, skipped",
    EVALUATE: "pruned, evaluate only",
    RUN: "to run",
    RERUN: "to run again",
}


@dataclass(frozen=True)
class CellPlan:
    cell: Cell
    action: str  # done | evaluate | run | rerun
    run_id: str | None = None  # the finished run (done, evaluate) or the last failed one (rerun)
    previous_status: str | None = None
    params: dict[str, str] = field(default_factory=dict)  # of that run, as logged

    @property
    def pending(self) -> bool:
        return self.action != DONE


@dataclass
class CellOutcome:
    plan: CellPlan
    run_id: str | None
    error: str | None = None
    seconds: float = 0.0  # the whole cell, in its process
    eval_seconds: float | None = None  # of which evaluation (None: the cell failed before it)

    @property
    def prune_seconds(self) -> float | None:
        """The rest of the cell: calibration, model load, pruning, logging."""
        return None if self.eval_seconds is None else self.seconds - self.eval_seconds


@dataclass
class SweepResult:
    parent_run_id: str | None
    plans: list[CellPlan]
    outcomes: list[CellOutcome]
    analysis_run_ids: list[str]
    analysis_errors: list[str]
    skipped_analyses: int
    seconds: float
    analysis_seconds: float = 0.0

    def time_split(self) -> dict[str, float]:
        """Where this sweep's time went, seconds: its cells' pruning (with calibration, loading and
        logging) and evaluation, the analyses, and the rest (planning, the store)."""
        prune = sum(o.prune_seconds or 0.0 for o in self.outcomes)
        evaluate = sum(o.eval_seconds or 0.0 for o in self.outcomes)
        failed = sum(o.seconds for o in self.outcomes if o.eval_seconds is None)
        split = {"prune": prune, "eval": evaluate, "failed cells": failed, "analyses": self.analysis_seconds}
        return split | {"other": max(0.0, self.seconds - sum(split.values()))}

    @property
    def failed(self) -> list[CellOutcome]:
        return [outcome for outcome in self.outcomes if outcome.error]


def plan_cells(study: Study, store: tracking.Store) -> list[CellPlan]:
    """What each cell needs, read from the store."""
    fingerprint = study.evaluate.fingerprint()
    plans = []
    for cell in study.cells:
        runs = find_prune_runs(store, cell.key, status=None)
        finished = [run for run in runs if run.status == "FINISHED"]
        complete = [run for run in finished if run.tags.get(EVAL_FINGERPRINT_TAG) == fingerprint]
        if complete:
            plans.append(CellPlan(cell, DONE, complete[0].run_id, "FINISHED", complete[0].params))
        elif finished:
            plans.append(CellPlan(cell, EVALUATE, finished[0].run_id, "FINISHED", finished[0].params))
        elif runs:
            plans.append(CellPlan(cell, RERUN, runs[0].run_id, runs[0].status, runs[0].params))
        else:
            plans.append(CellPlan(cell, RUN))
    return plans


def run_cell(
    plan: CellPlan, store: tracking.Store, tags: dict[str, str], keep: bool = False
) -> tuple[str, float]:
    """Prune and evaluate one cell (or only evaluate its finished run); returns the run id and the
    seconds its evaluation took.

    With `keep`, a method that updates the weights (SparseGPT) leaves them in the local cache for
    the sweep's activation analyses, which would otherwise prune again to rebuild the model.
    """
    evaluate, prune = plan.cell.evaluate, plan.cell.prune
    if plan.action == EVALUATE:
        assert plan.run_id is not None
        tracking.open_run(store, plan.run_id).set_tags(tags)
        started = time.perf_counter()
        run_eval(evaluate, store, plan.run_id)
        return plan.run_id, time.perf_counter() - started

    evaluated: list[float] = []

    def then(run_id: str, loaded) -> None:
        started = time.perf_counter()
        run_eval(evaluate, store, run_id, loaded)
        evaluated.append(time.perf_counter() - started)
        if keep and prune.method is not None and updates_weights(prune.identity()):
            keep_weights(run_id, loaded.model)

    result = run_prune(plan.cell.prune, store, tags=tags, then=then)
    return result.run_id, sum(evaluated)


# ---------------------------------------------------------------------------------------------
# Executors: each yields an outcome per pending cell, as cells end


def local_executor(
    plans: list[CellPlan], store: tracking.Store, tags: dict[str, str], keep: bool = False
) -> Iterator[CellOutcome]:
    for plan in plans:
        log.info("cell: %s (%s)", plan.cell.label, ACTIONS[plan.action])
        started = time.perf_counter()
        try:
            run_id, evaluated = run_cell(plan, store, {**tags, "cps.sweep.cell": plan.cell.label}, keep)
            yield CellOutcome(plan, run_id, seconds=time.perf_counter() - started, eval_seconds=evaluated)
        except Exception as error:  # one cell's crash is recorded (its run ended FAILED); go on
            log.exception("cell %s failed", plan.cell.label)
            message = f"{type(error).__name__}: {first_line(error)}"
            yield CellOutcome(plan, None, message, time.perf_counter() - started)
        finally:
            gc.collect()


def _ray_cell(
    plan: CellPlan, store: tracking.Store, tags: dict[str, str], threads: int, keep: bool
) -> tuple[str, float, float]:

    torch.set_num_threads(max(1, threads))
    started = time.perf_counter()
    run_id, evaluated = run_cell(plan, store, {**tags, "cps.sweep.cell": plan.cell.label}, keep)
    return run_id, time.perf_counter() - started, evaluated


def ray_executor(address: str | None = None, cpus_per_cell: int = 1) -> Callable[..., Iterator[CellOutcome]]:
    """Each cell a Ray task: one GPU per cell when the cluster has GPUs, else `cpus_per_cell` CPUs.

    Every worker writes to the same store: give an `http://` tracking server (or a store every
    node can reach) when the cluster spans machines.
    """
    return ClusterSession(RayBackend(address), cpus_per_cell).run


# Environment a worker needs to find the same data, caches and store as this process.
WORKER_ENV = ("CPS_DATA_DIR", "CPS_CACHE_DIR", "MLFLOW_TRACKING_URI", "HF_HOME")
# Stores every node reaches over the network; anything else is a file on one machine.
SERVER_STORES = ("http://", "https://", "postgresql", "mysql", "mssql")


@dataclass(frozen=True)
class ClusterShape:
    """How a sweep runs its cells on the cluster at hand."""

    resources: dict[str, int]  # per cell: {"num_gpus": 1} or {"num_cpus": n}
    store: tracking.Store  # as the cells see it: resolved, since a worker's working folder is not ours
    keeps_weights: bool  # kept weights live in one machine's cache: a local, one-node cluster only


def cluster_shape(
    nodes: int, resources: Mapping[str, float], store: tracking.Store, cpus_per_cell: int, local: bool
) -> ClusterShape:
    """From what the cluster reports (alive nodes, its resources: `{"GPU": 8.0, "CPU": 64.0}`) and
    whether it was started here (`local`, no address): the shape of the sweep. A store on one
    machine's disk with more than one node is refused (`check_store_reach`)."""
    check_store_reach(store, nodes)
    per_cell = {"num_gpus": 1} if resources.get("GPU", 0) else {"num_cpus": cpus_per_cell}
    resolved = tracking.Store(store.resolved_uri, store.experiment)
    return ClusterShape(per_cell, resolved, keeps_weights=local and nodes == 1)


def check_store_reach(store: tracking.Store, nodes: int) -> None:
    """A SQLite store (or a plain folder) is one machine's file: workers on other nodes would each
    write a store of their own, or corrupt a shared one over a network file system."""
    uri = store.resolved_uri
    if nodes > 1 and not uri.startswith(SERVER_STORES):
        raise CpsError(
            f"the Ray cluster has {nodes} nodes but the tracking store {uri} is one machine's file; "
            "run an MLflow server (README: 'Many machines') and pass --tracking-uri http://HOST:PORT"
        )


class ClusterBackend(Protocol):
    """What a `ClusterSession` asks of a cluster: `RayBackend`, or a stand-in in the tests."""

    local: bool  # the cluster is started on this machine (no address given)

    def init(self) -> bool:
        """Connect (or start a local cluster); True when started here, so `shutdown` is due."""
        ...

    def cluster(self) -> tuple[int, Mapping[str, float]]:
        """The alive nodes and the cluster's resources."""
        ...

    def remote(self, resources: Mapping[str, int]) -> Callable[..., Any]:
        """A function submitting `_ray_cell(...)` as a task with these resources, returning its
        reference."""
        ...

    def wait(self, refs: list[Any]) -> Any:
        """The first of `refs` to end."""
        ...

    def get(self, ref: Any) -> tuple[str, float, float]:
        """An ended cell's (run id, seconds, evaluation seconds), or its error raised (wrapped,
        the cell's own exception as `.cause`, as Ray's `RayTaskError` does)."""
        ...

    def shutdown(self) -> None: ...


@dataclass
class ClusterSession:
    """One sweep's cells on a cluster. `run` connects, sizes the cells to the cluster
    (`cluster_shape`), submits every cell, yields each cell's outcome as it ends (a cell's
    exception becomes its outcome's error), and shuts down a cluster it started, however it ends."""

    backend: ClusterBackend
    cpus_per_cell: int = 1

    def run(
        self, plans: list[CellPlan], store: tracking.Store, tags: dict[str, str], keep: bool = False
    ) -> Iterator[CellOutcome]:
        started_here = self.backend.init()
        try:
            nodes, resources = self.backend.cluster()
            shape = cluster_shape(nodes, resources, store, self.cpus_per_cell, self.backend.local)
            submit = self.backend.remote(shape.resources)
            keep = keep and shape.keeps_weights
            pending = {submit(plan, shape.store, tags, self.cpus_per_cell, keep): plan for plan in plans}
            submitted = {ref: time.perf_counter() for ref in pending}
            while pending:
                ready = self.backend.wait(list(pending))
                plan = pending.pop(ready)
                try:
                    run_id, seconds, evaluated = self.backend.get(ready)
                    yield CellOutcome(plan, run_id, seconds=seconds, eval_seconds=evaluated)
                except Exception as error:  # the task's error wraps the cell's exception
                    cause = getattr(error, "cause", None) or error
                    message = f"{type(cause).__name__}: {first_line(cause)}"
                    yield CellOutcome(plan, None, message, time.perf_counter() - submitted[ready])
        finally:
            if started_here:
                self.backend.shutdown()


class RayBackend:
    """`ClusterBackend` on Ray: the cluster at `address`, or without one a local instance on the
    loopback interface with a small object store. Workers get this process's `WORKER_ENV`."""

    def __init__(self, address: str | None = None) -> None:
        self.address = address
        self.local = not address

    @property
    def _ray(self) -> Any:
        # Imported on use: Ray is optional (pip install 'cps[ray]') and slow to import.
        try:
            import ray
        except ImportError:
            raise CpsError("the ray executor needs Ray: pip install 'cps[ray]'") from None
        return ray

    def init(self) -> bool:
        ray = self._ray
        if ray.is_initialized():
            return False
        env = {name: os.environ[name] for name in WORKER_ENV if name in os.environ}
        local = {"_node_ip_address": "127.0.0.1", "object_store_memory": 512 * 2**20}
        try:
            ray.init(
                address=self.address,
                runtime_env={"env_vars": env},
                include_dashboard=False,
                log_to_driver=True,
                configure_logging=False,
                **(local if self.local else {}),
            )
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise CpsError(
                f"cannot reach the Ray cluster {self.address or '(local)'}: {first_line(error)}"
            ) from None
        return True

    def cluster(self) -> tuple[int, Mapping[str, float]]:
        ray = self._ray
        return sum(1 for node in ray.nodes() if node.get("Alive")), ray.cluster_resources()

    def remote(self, resources: Mapping[str, int]) -> Callable[..., Any]:
        return self._ray.remote(**resources, max_retries=0)(_ray_cell).remote

    def wait(self, refs: list[Any]) -> Any:
        (ready,), _ = self._ray.wait(refs, num_returns=1)
        return ready

    def get(self, ref: Any) -> tuple[str, float, float]:
        return self._ray.get(ref)

    def shutdown(self) -> None:
        self._ray.shutdown()


# ---------------------------------------------------------------------------------------------
# The sweep


def _parent(store: tracking.Store, study: Study) -> tuple[str | None, dict]:
    """The existing parent run of this study (same fingerprint), if any, and the params of a new one."""
    params = {
        "study": study.name,
        "study_fingerprint": study.fingerprint,
        "cells": len(study.cells),
        "models": ",".join(dict.fromkeys(cell.prune.model for cell in study.cells)),
        "methods": ",".join(dict.fromkeys(cell.prune.variant for cell in study.cells)),
    }
    previous = tracking.find_runs(store, "sweep", {"study_fingerprint": study.fingerprint}, status=None)
    for record in previous:
        if record.status == "RUNNING":
            raise CpsError(
                f"study {study.name!r} is already being swept (run {record.run_id}, process "
                f"{record.tags.get('cps.pid', '?')} on {record.tags.get('cps.host', '?')})"
            )
    return (previous[0].run_id if previous else None), params


def run_sweep(
    study: Study,
    store: tracking.Store,
    executor: Callable[..., Iterable[CellOutcome]] = local_executor,
) -> SweepResult:

    started = time.perf_counter()
    tracking.client(store)
    check_inputs(study)
    stale = tracking.fail_stale_runs(store)
    if stale:
        log.warning("ended %d run(s) left RUNNING by a dead process as FAILED", len(stale))
    plans = plan_cells(study, store)
    parent_id, params = _parent(store, study)
    if parent_id is None:
        context = tracking.start_run(store, "sweep", params, f"sweep-{study.name}")
    else:
        context = tracking.resume_run(store, parent_id)
    outcomes: list[CellOutcome] = []
    with context as parent:
        if parent_id is None:
            parent.set_tags({"cps.study.description": study.description})
            parent.log_text(study.source, "study.toml")
        parent.set_tags({FINDINGS_DELTA_TAG: study.findings_delta})  # the report's equivalence margin
        tags = {
            "mlflow.parentRunId": parent.run_id,
            "cps.sweep.run_id": parent.run_id,
            "cps.study": study.name,
        }
        pending = [plan for plan in plans if plan.pending]
        keep = any(config.activations for config in study.analyses)
        with tqdm(total=len(pending), desc=f"sweep {study.name}", unit="cell") as bar:
            for outcome in executor(pending, store, tags, keep):
                outcomes.append(outcome)
                bar.update()
                bar.set_postfix(failed=sum(1 for o in outcomes if o.error))
                parent.log_metrics(_progress(plans, outcomes))
        analyses_started = time.perf_counter()
        try:
            analysis_ids, analysis_errors, skipped = run_analyses(study, store, tags)
        finally:  # the kept weights served the analyses; they are not a store of models
            drop_kept_weights([run_id for run_id in _run_ids(plans, outcomes) if run_id])
        analysis_seconds = time.perf_counter() - analyses_started
        seconds = time.perf_counter() - started
        result = SweepResult(
            parent.run_id, plans, outcomes, analysis_ids, analysis_errors, skipped, seconds, analysis_seconds
        )
        split = {f"time.{part.replace(' ', '_')}_s": value for part, value in result.time_split().items()}
        parent.log_metrics(
            {
                **_progress(plans, outcomes),
                "analyses.run": len(analysis_ids),
                "analyses.failed": len(analysis_errors),
                "time.sweep_s": seconds,
                **split,
            }
        )
        parent.log_frame(plan_frame(plans, outcomes), "cells.parquet")
        describe(store, parent.run_id)
    return result


def _run_ids(plans: list[CellPlan], outcomes: list[CellOutcome]) -> list[str | None]:
    return [plan.run_id for plan in plans] + [outcome.run_id for outcome in outcomes]


def _progress(plans: list[CellPlan], outcomes: list[CellOutcome]) -> dict[str, float]:
    failed = sum(1 for outcome in outcomes if outcome.error)
    return {
        "cells.total": len(plans),
        "cells.skipped": sum(1 for plan in plans if not plan.pending),
        "cells.finished": len(outcomes) - failed,
        "cells.failed": failed,
    }


def plan_frame(plans: list[CellPlan], outcomes: Iterable[CellOutcome] = ()) -> pl.DataFrame:

    by_cell = {id(outcome.plan.cell): outcome for outcome in outcomes}
    rows = []
    for plan in plans:
        outcome = by_cell.get(id(plan.cell))
        rows.append(
            {
                "cell": plan.cell.label,
                "action": plan.action,
                "previous_status": plan.previous_status,
                "run_id": outcome.run_id if outcome else plan.run_id,
                "error": outcome.error if outcome else None,
                "seconds": outcome.seconds if outcome else None,
                "prune_s": outcome.prune_seconds if outcome else None,
                "eval_s": outcome.eval_seconds if outcome else None,
                **{f"param.{k}": v for k, v in plan.cell.key.items()},
            }
        )
    return pl.DataFrame(rows)


def finished_cells(study: Study, store: tracking.Store) -> list[tuple[str, dict[str, str]]]:
    """(run id, params) of this study's finished, evaluated pruned cells."""
    return [
        (plan.run_id, plan.params)
        for plan in plan_cells(study, store)
        if plan.action == DONE and not plan.cell.prune.dense and plan.run_id
    ]


def run_analyses(
    study: Study, store: tracking.Store, tags: dict[str, str]
) -> tuple[list[str], list[str], int]:
    """Each analysis group of the study once: skipped when an identical analysis run finished."""
    run_ids, errors, skipped = [], [], 0
    runs = finished_cells(study, store) if study.analyses else []
    for config in study.analyses:
        for group in comparison_groups(runs, config.group_by):
            params = {k: str(v) for k, v in analysis_params(group, config).items()}
            found = tracking.find_runs(store, "analyze", params)
            if any(same_quantization(params, record.params) for record in found):
                skipped += 1
                continue
            log.info("analysis by %s: %s", config.group_by, json.dumps(group.members))
            try:
                run_ids.append(analyze_group(store, group, config, tags).run_id)
            except Exception as error:  # recorded in its FAILED run; the other groups still run
                log.exception("analysis of %s failed", group.members)
                errors.append(f"{type(error).__name__}: {first_line(error)}")
            finally:
                gc.collect()
    return run_ids, errors, skipped
