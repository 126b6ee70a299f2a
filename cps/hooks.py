"""Forward hooks on decoder layers, shared by the pruning engine and the held-out statistics."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


def layer_output(output: Any) -> torch.Tensor:
    """transformers 5.x layers return a Tensor, older versions a tuple."""
    return output[0] if isinstance(output, tuple) else output


@contextmanager
def output_hooks(modules: Sequence[nn.Module], record: Callable[[int, torch.Tensor], None]) -> Iterator[None]:
    """While inside, `record(i, output)` sees the output tensor of `modules[i]` on every call."""
    handles = [
        module.register_forward_hook(lambda m, args, out, i=i: record(i, layer_output(out)))
        for i, module in enumerate(modules)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
