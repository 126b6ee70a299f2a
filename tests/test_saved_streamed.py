"""Streamed prune runs of the real models, saved shard by shard and read back by plain
`from_pretrained` and `mlflow.transformers.load_model` (the round trip of tests/test_saved_models.py;
a file of their own so that `--dist loadfile` gives the slowest round trips to both workers)."""

from __future__ import annotations

import pytest
from test_saved_models import saved_run_loads_anywhere


@pytest.mark.slow  # ~10 min in all on 2 busy cores (`make test-all`, CI)
@pytest.mark.parametrize(
    "name, method",
    [
        ("gemma3-270m", "wanda"),
        ("gemma3-270m", "sparsegpt"),
        ("smollm2-135m", "wanda"),
        ("smollm2-135m", "sparsegpt"),
    ],
)
def test_saved_streamed_real_models_load_anywhere(name, method, store, tmp_path):
    saved_run_loads_anywhere(store, tmp_path, name, method, stream=True)
