"""Activation statistics on held-out text, for LAPE, LSAR and the cross-language SNR view.

The text is cut into windows exactly as for perplexity (`cps.evaluation.windows`: each document on
its own, every window starting with BOS), and every statistic is taken at the scored positions
only: each document token once, never a window's first position (BOS, an attention sink whose
hidden state dwarfs all others). Per decoder layer this gathers how often each FFN neuron fires (for
gated MLPs: act_fn(gate_proj x) > 0; otherwise the activation's output > 0) and the sum of the
layer's output hidden states (per-language means for LSAR). Against the dense model's states at the
same positions (recorded once, see `cps.evaluation.hidden`) it gathers the signal ||h_ref||^2, the
deviation ||h - h_ref||^2 and the deviation's second moment sum(delta delta^T), from which the part
inside any subspace U follows later as tr(U^T C U) without another pass. One forward pass per model
and language serves all of them; only the base model runs (no LM head).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from cps.errors import CpsError
from cps.evaluation.hidden import PositionSample, SnrMeter, StateRecorder
from cps.evaluation.perplexity import LayerObserver, score_windows
from cps.evaluation.windows import Batch, HeldOutText
from cps.hooks import output_hooks
from cps.models import decoder_layers


@dataclass
class ActivationStats:
    tokens: int
    active: torch.Tensor  # (layers, neurons) tokens on which each FFN neuron fired
    hidden_sum: torch.Tensor  # (layers, d) sum of each layer's output hidden states

    @property
    def probabilities(self) -> torch.Tensor:
        return self.active / self.tokens

    @property
    def hidden_mean(self) -> torch.Tensor:
        return self.hidden_sum / self.tokens


@dataclass
class DeviationStats:
    tokens: int  # positions compared (the reference's sample)
    signal: torch.Tensor  # (layers,) sum ||h_ref||^2
    noise: torch.Tensor  # (layers,) sum ||h - h_ref||^2
    second_moment: torch.Tensor  # (layers, d, d) sum delta delta^T

    @property
    def snr_db(self) -> torch.Tensor:
        return 10 * torch.log10(self.signal / self.noise)


def activation_module(layer: nn.Module) -> nn.Module:
    """The FFN activation inside a decoder layer (`mlp.act_fn` in Llama, Gemma, Qwen2, Cohere)."""
    mlp = getattr(layer, "mlp", None) or getattr(layer, "feed_forward", None)
    candidates = [module for name, module in (mlp.named_modules() if mlp else []) if name.endswith("act_fn")]
    if not candidates:
        raise CpsError(f"cannot find the FFN activation of {type(layer).__name__}")
    return candidates[0]


class Observers(LayerObserver):
    """Several observers of one forward pass."""

    def __init__(self, *observers: LayerObserver) -> None:
        self.observers = observers

    def begin(self, batch: Batch) -> None:
        for observer in self.observers:
            observer.begin(batch)

    def layer(self, index: int, states: torch.Tensor) -> None:
        for observer in self.observers:
            observer.layer(index, states)


class ActivationCounter(LayerObserver):
    """Firing counts of the FFN neurons and sums of the layer outputs at the scored positions."""

    def __init__(self, layers: int) -> None:
        self.active: list[torch.Tensor | None] = [None] * layers
        self.hidden: list[torch.Tensor | None] = [None] * layers
        self.tokens = 0
        self._scored: torch.Tensor | None = None

    def begin(self, batch: Batch) -> None:
        self._scored = batch.scored

    def layer(self, index: int, states: torch.Tensor) -> None:
        if index == 0:  # (a streamed pass calls `begin` before every layer of a batch)
            self.tokens += states.shape[0]
        _add(self.hidden, index, states.double().sum(0).cpu())

    def fired(self, index: int, output: torch.Tensor) -> None:
        assert self._scored is not None
        chosen = output[self._scored.to(output.device)]  # (n, neurons)
        _add(self.active, index, (chosen > 0).sum(0).double().cpu())

    @contextmanager
    def watching(self, model: nn.Module) -> Iterator[None]:
        """Counts firing FFN neurons while inside."""
        with output_hooks([activation_module(layer) for layer in decoder_layers(model)], self.fired):
            yield

    def result(self) -> ActivationStats:
        return ActivationStats(self.tokens, torch.stack(self.active), torch.stack(self.hidden))  # type: ignore[arg-type]


class DeviationMeter(SnrMeter):
    """The SNR meter plus the second moment of the deviation, per layer."""

    def __init__(self, sample: PositionSample, reference: torch.Tensor) -> None:
        super().__init__(sample, reference)
        width = reference.shape[-1]
        self.second = torch.zeros(reference.shape[0], width, width, dtype=torch.float64)

    def accumulate(self, index: int, dense: torch.Tensor, delta: torch.Tensor) -> None:
        super().accumulate(index, dense, delta)
        self.second[index] += delta.T @ delta

    def result(self) -> DeviationStats:
        return DeviationStats(self.sample.size, self.signal, self.noise, self.second)


def _add(store: list[torch.Tensor | None], index: int, value: torch.Tensor) -> None:
    store[index] = value if store[index] is None else store[index] + value


@torch.inference_mode()
def activation_statistics(
    model: nn.Module,
    text: HeldOutText,
    reference: tuple[PositionSample, torch.Tensor] | None = None,
    record: PositionSample | None = None,
) -> tuple[ActivationStats, DeviationStats | None, torch.Tensor | None]:
    """Firing counts and hidden sums of `model` on `text`, in one pass; with `reference` (the dense
    states at a sample of the scored positions) also the deviation from them; with `record` the
    model's own states at that sample (to serve as a reference)."""
    count = len(decoder_layers(model))
    counter = ActivationCounter(count)
    meter = DeviationMeter(*reference) if reference is not None else None
    recorder = StateRecorder(record, count) if record is not None else None
    observers = Observers(*[o for o in (counter, meter, recorder) if o is not None])
    with counter.watching(model):
        score_windows(model, text.windows, observers, head=False)
    return (
        counter.result(),
        meter.result() if meter else None,
        recorder.states if recorder else None,
    )
