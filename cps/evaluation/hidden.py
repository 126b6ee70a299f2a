"""Held-out SNR of a pruned model's hidden states against the dense model's, and the disk cache of
the dense states it compares against.

    snr_db(layer) = 10 log10( sum ||h_dense||^2 / sum ||h_pruned - h_dense||^2 )

with h the output of a decoder layer, summed over the scored positions of one language's held-out
text (`cps.evaluation.windows`: each document token once, never a window's BOS position). `cps eval`
logs the per-layer series `snr_db.<lang>.layer` and its mean over layers `snr_db.<lang>`; the
pruned model's states come from the same forward passes as its perplexity.

The dense states are computed once per (model, dtype, device type, exact windows) and kept in the
cache dir (`hidden/`), bounded: at most `CPS_HIDDEN_CACHE_GB` (default 8) in all, least recently
used entries dropped first. A language whose states would take more than an eighth of that keeps
every k-th scored position (the smallest k that fits; the same positions for every pruned model,
logged as `snr_positions.<lang>`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cps.errors import first_line
from cps.evaluation.perplexity import LayerObserver, score_windows
from cps.evaluation.windows import Batch, HeldOutText
from cps.models import decoder_layers
from cps.paths import cache_dir, discard, publish, staging
from cps.streaming import model_device

log = logging.getLogger(__name__)

DEFAULT_CACHE_GB = 8.0
ENTRY_SHARE = 8  # one language's states take at most this fraction of the cache


def cache_bound_bytes() -> int:
    return int(float(os.environ.get("CPS_HIDDEN_CACHE_GB", DEFAULT_CACHE_GB)) * 2**30)


@dataclass(frozen=True)
class PositionSample:
    """Every `every`-th scored position of a held-out text (in window order), as batches see them."""

    offsets: tuple[int, ...]  # per window: index of its first scored position in the whole text
    total: int  # scored positions in the text
    every: int

    @classmethod
    def of(cls, text: HeldOutText, every: int = 1) -> PositionSample:
        offsets, total = [], 0
        for window in text.windows:
            offsets.append(total)
            total += window.scored
        return cls(tuple(offsets), total, every)

    @property
    def size(self) -> int:
        return (self.total + self.every - 1) // self.every

    def select(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(keep, index): which of the batch's scored positions are sampled, and their sample slots."""
        counts = batch.scored.sum(1).tolist()
        positions = torch.cat(
            [torch.arange(count) + self.offsets[row] for row, count in zip(batch.rows, counts, strict=True)]
        )
        keep = positions % self.every == 0
        return keep, positions[keep] // self.every


class SampledObserver(LayerObserver):
    """An observer of the hidden states at the positions of a `PositionSample`."""

    def __init__(self, sample: PositionSample) -> None:
        self.sample = sample
        self._select: tuple[torch.Tensor, torch.Tensor] | None = None

    def begin(self, batch: Batch) -> None:
        self._select = self.sample.select(batch)

    def sampled(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, d) states of the current batch at the sampled positions, and their slots (n,)."""
        assert self._select is not None
        keep, slots = self._select
        return states[keep.to(states.device)], slots


class StateRecorder(SampledObserver):
    """Keeps the sampled hidden states of every layer: (layers, positions, d), on the CPU."""

    def __init__(self, sample: PositionSample, layers: int) -> None:
        super().__init__(sample)
        self.layers = layers
        self.states: torch.Tensor | None = None

    def layer(self, index: int, states: torch.Tensor) -> None:
        chosen, slots = self.sampled(states)
        if self.states is None:
            self.states = torch.zeros(self.layers, self.sample.size, states.shape[-1], dtype=states.dtype)
        self.states[index, slots] = chosen.cpu()


class SnrMeter(SampledObserver):
    """Signal and noise of every layer's states against recorded reference states."""

    def __init__(self, sample: PositionSample, reference: torch.Tensor) -> None:
        super().__init__(sample)
        self.reference = reference  # (layers, positions, d)
        layers = reference.shape[0]
        self.signal = torch.zeros(layers, dtype=torch.float64)
        self.noise = torch.zeros(layers, dtype=torch.float64)

    def layer(self, index: int, states: torch.Tensor) -> None:
        chosen, slots = self.sampled(states)
        dense = self.reference[index, slots].double()
        self.accumulate(index, dense, chosen.double().cpu() - dense)

    def accumulate(self, index: int, dense: torch.Tensor, delta: torch.Tensor) -> None:
        """Adds one batch's (n, d) reference states and deviations from them."""
        self.signal[index] += (dense**2).sum()
        self.noise[index] += (delta**2).sum()

    @property
    def snr_db(self) -> list[float]:
        """Per layer; +inf where the states are identical."""
        return [
            math.inf if noise == 0 else 10 * math.log10(signal / noise)
            for signal, noise in zip(self.signal.tolist(), self.noise.tolist(), strict=True)
        ]


# ---------------------------------------------------------------------------------------------
# The cache of dense states


@dataclass(frozen=True)
class ReferenceKey:
    """What the dense states depend on: the weights, the arithmetic and the exact windows."""

    model_id: str
    dtype: str
    device_type: str
    text: str  # HeldOutText.fingerprint()
    every: int

    @property
    def path(self) -> Path:
        digest = hashlib.sha256(json.dumps(self.__dict__, sort_keys=True).encode()).hexdigest()[:20]
        return cache_dir() / "hidden" / f"{digest}.safetensors"


def sampling_for(text: HeldOutText, layers: int, width: int, element_bytes: int) -> PositionSample:
    """All scored positions, or every k-th when one language's states would outgrow its share."""
    full = PositionSample.of(text)
    budget = cache_bound_bytes() // ENTRY_SHARE
    per_position = layers * width * element_bytes
    every = max(1, math.ceil(full.total * per_position / max(budget, 1)))
    if every > 1:
        log.info(
            "dense states: every %d-th of %d positions kept (cache share %d B)", every, full.total, budget
        )
    return PositionSample.of(text, every)


def load_reference(key: ReferenceKey) -> torch.Tensor | None:

    path = key.path
    if not path.is_file():
        return None
    try:
        states = load_file(str(path))["states"]
    except (SafetensorError, OSError, KeyError) as error:
        discard(path, first_line(error))
        return None
    with contextlib.suppress(OSError):  # recently used (unless another process evicted it)
        os.utime(path)
    return states


def save_reference(key: ReferenceKey, states: torch.Tensor) -> None:
    """Publish atomically, then drop the least recently used entries beyond the bound."""

    path = key.path
    built = staging(path)
    save_file({"states": states.contiguous()}, str(built), {"key": json.dumps(key.__dict__)})
    publish(built, path)
    entries = []
    for entry in path.parent.glob("*.safetensors"):
        with contextlib.suppress(OSError):  # another process may be evicting too
            stat = entry.stat()
            entries.append((stat.st_mtime, stat.st_size, entry))
    total = 0
    for _, size, entry in sorted(entries, key=lambda e: e[0], reverse=True):
        total += size
        if total > cache_bound_bytes() and entry != path:
            entry.unlink(missing_ok=True)


def reference_plan(
    model: torch.nn.Module, model_id: str, text: HeldOutText
) -> tuple[ReferenceKey, PositionSample]:
    """Which positions the dense states of `text` keep, and their cache key, for models shaped like
    `model` (same layers, width, dtype and device as the dense model they are compared with)."""
    parameter = next(model.parameters())
    width = int(model.config.get_text_config().hidden_size)
    sample = sampling_for(text, len(decoder_layers(model)), width, parameter.element_size())
    key = ReferenceKey(
        model_id, str(parameter.dtype), model_device(model).type, text.fingerprint(), sample.every
    )
    return key, sample


class DenseStates:
    """The dense model's hidden states on held-out texts: from the cache, else computed and cached
    (the dense model loaded once, on first need, by `load`)."""

    def __init__(self, load: Callable[[], torch.nn.Module]) -> None:
        self._load = load
        self._model: torch.nn.Module | None = None

    def ensure(self, key: ReferenceKey, sample: PositionSample, text: HeldOutText) -> None:
        """Computed and cached, unless the cache holds it already."""
        if not key.path.is_file():
            self.get(key, sample, text)

    def get(self, key: ReferenceKey, sample: PositionSample, text: HeldOutText) -> torch.Tensor:
        cached = load_reference(key)
        if cached is not None:
            return cached
        if self._model is None:
            log.info("computing the dense model's hidden states once (cached in %s)", key.path.parent)
            self._model = self._load()
        recorder = StateRecorder(sample, len(decoder_layers(self._model)))
        score_windows(self._model, text.windows, recorder, head=False)
        assert recorder.states is not None
        save_reference(key, recorder.states)
        return recorder.states

    def release(self) -> None:
        self._model = None
