from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cps import tracking
from cps.config import CalibrationConfig
from cps.data.calibration import build_calibration


def cps(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cps", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["calibrate"],
        ["prune"],
        ["quantize"],
        ["eval"],
        ["analyze"],
        ["sweep"],
        ["report"],
        ["ui"],
        ["data"],
        ["data", "list"],
        ["models"],
    ],
)
def test_help_is_fast(command):
    started = time.monotonic()
    result = cps(*command, "--help")
    elapsed = time.monotonic() - started
    assert result.returncode == 0 and "Usage" in result.stdout
    assert elapsed < 1.5, f"cps {' '.join(command)} --help took {elapsed:.2f}s"


# Fields whose flag is named otherwise (a repeatable flag, or the calibration spelled out in flags).
FLAG_NAMES = {"task_limits": "--task-limit", "filters": "--filter", "calib_run": "--calib"}
NOT_FLAGS = {"calibration", "from_run"}  # calibration: from --lang, --corpus, ...; from_run: cps quantize's


@pytest.mark.parametrize(
    ("command", "config"),
    [
        ("calibrate", "CalibrationConfig"),
        ("prune", "PruneConfig"),
        ("eval", "EvalConfig"),
        ("analyze", "AnalyzeConfig"),
    ],
)
def test_every_config_field_has_its_flag(command, config):
    """A config field is its command's flag of the same name: adding an option is a field and a flag."""
    import dataclasses

    from cps import config as configs
    from cps.cli import app

    options = {
        name for info in typer_command(app, command).params for name in info.opts if name.startswith("--")
    }
    missing = [
        field.name
        for field in dataclasses.fields(getattr(configs, config))
        if field.name not in NOT_FLAGS
        and FLAG_NAMES.get(field.name, "--" + field.name.replace("_", "-")) not in options
    ]
    assert not missing, f"cps {command} has no flag for {missing}"


def typer_command(app, name: str):
    import typer.main

    group = typer.main.get_command(app)
    return group.commands[name]


def _store_args(store: tracking.Store) -> list[str]:
    return ["--tracking-uri", str(store.uri)]


def test_calibrate_logs_a_run_that_reads_back(store, tmp_path, tiny_tokenizer, capsys):
    args = ["calibrate", "--model", "tiny-llama", "--lang", "sw", "--nsamples", "4", "--seqlen", "32"]
    first = cps_here([*args, "--seed", "7", *_store_args(store)], capsys)
    assert first.returncode == 0, first.stderr
    assert "(built)" in first.stdout and "new run" in first.stdout
    (run,) = tracking.find_runs(store, "calibrate")
    assert run.run_id in first.stdout
    assert {
        k: run.params[k] for k in ("model", "calib_lang", "calib_corpus", "nsamples", "seqlen", "seed")
    } == {
        "model": "tiny-llama",
        "calib_lang": "sw",
        "calib_corpus": "ntrex",
        "nsamples": "4",
        "seqlen": "32",
        "seed": "7",
    }
    assert run.params["model_id"] == "cps:tiny-llama@seed0"
    expected = build_calibration(CalibrationConfig("tiny-llama", "sw", "ntrex", 4, 32, 7), tiny_tokenizer)
    assert run.params["calib_hash"] == expected.calib_hash
    assert run.metrics["calib.tokens"] == 128
    assert run.metrics["calib.coverage"] == pytest.approx(expected.summary_metrics()["calib.coverage"])
    from cps.runs import load_calibration_run

    logged = load_calibration_run(store, run.run_id)
    assert torch.equal(logged.input_ids, expected.input_ids)

    second = cps_here([*args, "--seed", "7", *_store_args(store)], capsys)
    assert second.returncode == 0 and "(cache hit)" in second.stdout and "existing run" in second.stdout
    assert len(tracking.find_runs(store, "calibrate", status=None)) == 1


def test_data_commands(corpora):
    listed = cps("data", "list")
    assert listed.returncode == 0 and "Swahili" in listed.stdout and "123 docs" in listed.stdout
    checked = cps("data", "check")
    assert checked.returncode == 0 and "all 37 corpus files parse" in checked.stdout
    models = cps("models")
    assert models.returncode == 0 and "gemma3-270m" in models.stdout and "aya23" in models.stdout


def _bad_inputs(tmp_path):
    empty = tmp_path / "texts"
    empty.mkdir()
    (empty / "sw.txt").write_text("\n", encoding="utf-8")
    broken = tmp_path / "broken"
    (broken / "ntrex").mkdir(parents=True)
    base = ["calibrate", "--model", "tiny-llama", "--nsamples", "2", "--seqlen", "16"]

    def study(text: str) -> Path:
        path = tmp_path / f"study{len(list(tmp_path.glob('study*.toml')))}.toml"
        path.write_text(text, encoding="utf-8")
        return path

    prune = ["prune", "--model", "tiny-llama", "--lang", "sw", "--nsamples", "2", "--seqlen", "16"]
    quantize = ["quantize", *prune[1:], "--group-size", "32"]
    return {
        "unknown model": (["calibrate", "--model", "no-such-model", "--lang", "sw"], "unknown model"),
        "unknown language": ([*base, "--lang", "xx"], "unknown language"),
        "bad mixture": ([*base, "--lang", "en:0.7,sw:0.7"], "sum to 1"),
        "unknown corpus": ([*base, "--lang", "sw", "--corpus", "wiki"], "unknown corpus"),
        "zero samples": ([*base, "--lang", "sw", "--nsamples", "0"], "--nsamples"),
        "empty data": ([*base, "--lang", "sw", "--corpus", f"textdir:{empty}"], "no 'sw' text"),
        "missing language": ([*base, "--lang", "en", "--corpus", f"textdir:{empty}"], "no 'en' data"),
        "missing data dir": ([*base, "--lang", "sw", "--data-dir", str(tmp_path / "x")], "does not exist"),
        "broken data dir": (["data", "check", "--data-dir", str(broken)], "problem(s)"),
        "offline mc4": ([*base, "--lang", "sw", "--corpus", "mc4"], "needs network access"),
        "sparsity 1": ([*prune, "--sparsity", "1.0"], "[0, 1)"),
        "negative sparsity": ([*prune, "--sparsity", "-0.5"], "[0, 1)"),
        "N:M with N>=M": ([*prune, "--pattern", "4:4"], "0 < N < M"),
        "bad pattern": ([*prune, "--pattern", "half"], "bad pattern"),
        "unknown method": ([*prune, "--method", "obc"], "unknown method"),
        "owl with 2:4": ([*prune, "--allocation", "owl", "--pattern", "2:4"], "OWL allocates unstructured"),
        "dsnot after sparsegpt": ([*prune, "--method", "sparsegpt", "--refine", "dsnot"], "changes the kept"),
        "layer removal with 2:4": ([*prune, "--method", "shortgpt", "--pattern", "2:4"], "no N:M form"),
        "unknown allocation": ([*prune, "--allocation", "lamp"], "unknown allocation 'lamp'"),
        "bits 9": ([*quantize, "--bits", "9"], "--bits must be between 2 and 8"),
        "group size 0": ([*quantize, "--group-size", "0"], "--group-size must be positive"),
        "group size not dividing": ([*quantize, "--group-size", "48"], "must divide"),
        "quantize a pruning method": ([*quantize, "--method", "wanda"], "wanda prunes"),
        "bits on layer removal": ([*prune, "--method", "shortgpt", "--bits", "4"], "removes whole layers"),
        "unknown quantizer": ([*prune, "--bits", "4", "--quant", "awq"], "unknown quantizer 'awq'"),
        "quantize an unknown run": ([*quantize, "--from-run", "deadbeef"], "no run 'deadbeef'"),
        "bad recipe": ([*prune, "--lang", "sw+sw"], "names 'sw' twice"),
        "unknown calib run": ([*prune, "--calib", "deadbeef"], "no run 'deadbeef'"),
        "prune without language": (["prune", "--model", "tiny-llama"], "--lang is required"),
        "eval unknown run": (["eval", "0123abcd"], "no run '0123abcd'"),
        "eval unknown task": (["eval", "--model", "tiny-llama", "--tasks", "nonsense"], "unknown task"),
        "eval missing language": (["eval", "--model", "tiny-llama", "--langs", "qu"], "no 'qu' data"),
        "eval nothing to evaluate": (["eval"], "give a run id"),
        "analyze empty store": (["analyze"], "no two finished prune runs"),
        "analyze bad filter": (["analyze", "--filter", "method"], "bad --filter"),
        "sweep missing study": (["sweep", str(tmp_path / "none.toml")], "no study file"),
        "sweep bad toml": (["sweep", str(study("[grid\n"))], "not valid TOML"),
        "sweep unknown key": (["sweep", str(study("[grid]\nmodel = 'x'\n"))], "unknown key 'model'"),
        "sweep unknown model": (["sweep", str(study("[grid]\nmodels = ['gpt5']\n"))], "unknown model"),
        "sweep bad executor": (["sweep", str(study("")), "--executor", "slurm"], "unknown executor"),
        "sweep missing data": (
            ["sweep", str(study("[calibration]\ncorpus = 'textdir:" + str(empty) + "'\n"))],
            "no 'ar' data",
        ),
        "report empty store": (["report"], "no finished prune runs"),
        "report bad format": (["report", "--format", "xlsx"], "unknown format"),
        "eval batch size 0": (["eval", "--model", "tiny-llama", "--batch-size", "0"], "--batch-size"),
        "eval bad task limit": (
            ["eval", "--model", "tiny-llama", "--task-limit", "sib=x"],
            "must be a number",
        ),
        "ui bad port": (["ui", "--port", "0"], "--port"),
    }


# Run as real processes (the rest in this process, which saves ~6 s of imports per case): cases
# that depend on what a fresh process reads at import (HF_ENDPOINT) and one of each command family.
IN_A_PROCESS = {"offline mc4", "missing language", "eval unknown run", "sweep bad toml", "ui bad port"}


def cps_here(args: list[str], capsys: pytest.CaptureFixture) -> subprocess.CompletedProcess:
    """`cps ARGS` run by the console script's own `main` inside this process."""
    from cps.cli import main

    capsys.readouterr()
    old_argv = sys.argv
    sys.argv = ["cps", *args]
    try:
        main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = old_argv
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


@pytest.mark.parametrize(
    "case",
    [
        "unknown model",
        "unknown language",
        "bad mixture",
        "unknown corpus",
        "zero samples",
        "empty data",
        "missing language",
        "missing data dir",
        "broken data dir",
        "offline mc4",
        "sparsity 1",
        "negative sparsity",
        "N:M with N>=M",
        "bad pattern",
        "unknown method",
        "owl with 2:4",
        "dsnot after sparsegpt",
        "layer removal with 2:4",
        "unknown allocation",
        "bits 9",
        "group size 0",
        "group size not dividing",
        "quantize a pruning method",
        "bits on layer removal",
        "unknown quantizer",
        "quantize an unknown run",
        "bad recipe",
        "unknown calib run",
        "prune without language",
        "eval unknown run",
        "eval unknown task",
        "eval missing language",
        "eval nothing to evaluate",
        "analyze empty store",
        "analyze bad filter",
        "sweep missing study",
        "sweep bad toml",
        "sweep unknown key",
        "sweep unknown model",
        "sweep bad executor",
        "sweep missing data",
        "report empty store",
        "report bad format",
        "eval batch size 0",
        "eval bad task limit",
        "ui bad port",
    ],
)
def test_bad_input_is_one_line_and_exit_2(case, tmp_path, store, monkeypatch, capsys):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # mC4 must fail the same way everywhere
    args, message = _bad_inputs(tmp_path)[case]
    if args[0] in ("calibrate", "prune", "quantize", "eval", "analyze", "sweep", "report", "ui"):
        args = [*args, *_store_args(store)]
    result = cps(*args) if case in IN_A_PROCESS else cps_here(args, capsys)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("cps: error: "), result.stderr
    assert message in lines[0]
    assert "Traceback" not in result.stderr
    assert tracking.find_runs(store, status=None) == []  # nothing logged, nothing left RUNNING


def test_unreachable_tracking_store_is_one_line_and_exit_2():
    started = time.monotonic()
    result = cps("calibrate", "--model", "tiny-llama", "--lang", "sw", "--tracking-uri", "http://127.0.0.1:9")
    assert result.returncode == 2
    assert result.stderr.strip().startswith("cps: error: tracking store http://127.0.0.1:9 is unreachable")
    assert len(result.stderr.strip().splitlines()) == 1
    assert time.monotonic() - started < 30


def test_prune_reuses_a_calibrate_run(store, capsys):
    calibrate = ["calibrate", "--model", "tiny-llama", "--lang", "zh", "--nsamples", "4", "--seqlen", "32"]
    calibrated = cps_here([*calibrate, *_store_args(store)], capsys)
    assert calibrated.returncode == 0, calibrated.stderr
    (calib_run,) = tracking.find_runs(store, "calibrate")
    prune = ["prune", "--model", "tiny-llama", "--calib", calib_run.run_id, "--method", "magnitude"]
    pruned = cps_here([*prune, "--no-save-model", *_store_args(store)], capsys)
    assert pruned.returncode == 0, pruned.stderr
    (run,) = tracking.find_runs(store, "prune")
    assert run.params["calib_hash"] == calib_run.params["calib_hash"]
    assert run.params["calib_lang"] == "zh" and run.tags["cps.calib_run_id"] == calib_run.run_id
    assert "actual sparsity 0.5000" in pruned.stdout
    other = cps_here(
        ["prune", "--model", "tiny-qwen2", "--calib", calib_run.run_id, *_store_args(store)], capsys
    )
    assert other.returncode == 2 and "tokenized for 'tiny-llama'" in other.stderr


def test_sigterm_ends_a_prune_run_killed(store):
    import signal

    tracking.experiment_id(store)  # the store exists before two processes use it
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cps",
            "prune",
            "--model",
            "gemma3-270m",
            "--lang",
            "sw",
            "--nsamples",
            "64",  # a minute of pruning: SIGTERM always lands before the run could finish
            "--seqlen",
            "256",
            "--no-save-model",
            *_store_args(store),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not tracking.find_runs(store, "prune", status="RUNNING"):
        assert process.poll() is None, process.communicate()
        time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=60)
    (run,) = tracking.find_runs(store, "prune", status=None)
    assert run.status == "KILLED"


WORKER = "threading.Thread(target=lambda: (time.sleep(0.5), print('worker done', flush=True))).start()"


@pytest.mark.parametrize(
    "ending, status, says",
    [
        ("", 0, "gemma3-270m"),  # the command's output, then the handlers
        ("sys.exit('stopped here')", 1, "stopped here"),
        ("sys.exit(3)", 3, ""),
        # a thread still working: the ordinary exit, which waits for it
        (
            "threading.Thread(target=lambda: (time.sleep(0.5), print('worker done', flush=True))).start()",
            0,
            "worker done",
        ),
    ],
)
def test_the_console_script_ends_without_teardown_but_runs_every_exit_handler(ending, status, says):
    """`run` skips the interpreter's teardown only: exit handlers (MLflow's, logging's, temporary
    folders') run, the output is complete, the status is the command's."""
    script = (
        "import atexit, sys, threading, time\n"
        "from cps import cli\n"
        "atexit.register(lambda: print('handler ran', flush=True))\n"
        "atexit.register(lambda: sys.stdout.write('unflushed tail'))\n"
        f"cli.main = lambda: (print('gemma3-270m'), {ending or 'None'})\n"
        "cli.run()\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == status, done.stderr
    output = done.stdout + done.stderr
    assert says in output and "handler ran" in done.stdout and "unflushed tail" in done.stdout
    assert "Traceback" not in done.stderr
