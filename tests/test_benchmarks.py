"""The benchmark scripts' own verdicts (the scripts run outside the default tests)."""

from __future__ import annotations

import importlib.util
import math
import sys

from conftest import REPO


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_names_every_departure_beyond_its_bounds():
    gpu_check = _script("gpu_check")
    reference = {"en": 20.0, "sw": 50.0}
    inside = gpu_check.departures(0.95, {"en": 20.5, "sw": 49.0}, reference, 0.90, 0.03)
    assert inside == []  # +2.5% and -2.0%: inside ±3%
    beyond = gpu_check.departures(0.80, {"en": 21.0, "sw": math.nan}, reference, 0.90, 0.03)
    assert beyond == ["IoU 0.8000 < 0.9", "ppl en +5.00% beyond ±3%", "ppl sw +nan% beyond ±3%"]


def test_gpu_check_without_cuda_exits_2(monkeypatch, capsys):
    gpu_check = _script("gpu_check")
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "argv", ["gpu_check.py"])
    assert gpu_check.main() == 2
    assert "no CUDA device" in capsys.readouterr().out
