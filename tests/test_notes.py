"""Run descriptions and the experiment's kind: what a user sees first in the MLflow UI."""

from __future__ import annotations

from cps import tracking
from cps.notes import describe, description


def test_a_pruned_and_evaluated_run_is_described_by_its_headline_figures():
    params = {
        "method": "wanda",
        "model": "gemma3-270m",
        "sparsity": "0.5",
        "pattern": "unstructured",
        "calib_lang": "sw",
        "calib_corpus": "ntrex",
        "nsamples": "8",
        "seqlen": "256",
    }
    metrics = {
        "calib_snr_db.mean": 14.24,
        "ppl.sw": 35.21,
        "ppl.en": 20.0,
        "ppl.zh": 50.0,
        "snr_db.sw": 10.0,
        "snr_db.en": 8.0,
        "snr_db.sw.layer": 2.0,  # a per-layer series' last value: not a language's SNR
        "acc.sib_sw": 0.6,
        "acc.sib_en": 0.7,
        "acc_stderr.sib_sw": 0.05,
        "acc.flores_next_sw": 0.9,  # flores_next reads acc_mutual_info
        "acc_mutual_info.flores_next_sw": 0.4,
    }
    assert description("prune", params, metrics) == (
        "wanda 50% unstructured of gemma3-270m, calibrated on sw (ntrex 8 x 256) | in-sample SNR 14.2 dB"
        " | held-out ppl sw 35.2 (mean of 3: 35.1), SNR 9.0 dB | flores_next 0.40, sib 0.65 (task means)"
    )
    dense = description("prune", {"method": "dense", "model": "gemma3-270m"}, {"ppl.en": 20.0})
    assert dense == "dense gemma3-270m (the unpruned baseline) | held-out ppl en 20.0"
    sweep = description(
        "sweep",
        {"study": "demo", "cells": "15"},
        {"cells.skipped": 4, "cells.finished": 10, "cells.failed": 1, "time.sweep_s": 600},
    )
    assert sweep == "study demo: 14 of 15 cells done, 1 failed | 10.0 min"


def test_experiments_open_on_their_runs_and_runs_carry_their_description(tmp_path):
    store = tracking.Store(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = tracking.client(store).get_experiment(tracking.experiment_id(store))
    assert experiment.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    old = tracking.Store(store.uri, "made-before")  # an experiment an older cps created: tagged on use
    tracking.client(old).create_experiment("made-before")
    experiment = tracking.client(old).get_experiment(tracking.experiment_id(old))
    assert experiment.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    with tracking.start_run(store, "calibrate", {"model": "m", "nsamples": 4, "seqlen": 8}) as run:
        pass
    text = describe(store, run.run_id)
    assert tracking.get_run(store, run.run_id).tags[tracking.NOTE_TAG] == text
    assert text.startswith("calibration windows for m: 4 x 8 tokens")
