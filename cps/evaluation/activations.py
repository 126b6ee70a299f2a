"""Activation statistics on held-out text, for LAPE, LSAR and the cross-language SNR view (issue 5).

The text is cut exactly as for perplexity. Per decoder layer this gathers, over all tokens:
how often each FFN neuron fires (for gated MLPs: act_fn(gate_proj x) > 0; otherwise the activation's
output > 0), and the sum of the layer's output hidden states (per-language means for LSAR).
Against a reference model on the same tokens it gathers the signal ||h_ref||^2, the deviation
||h - h_ref||^2 and the deviation's second moment sum(delta delta^T), from which the part inside any
subspace U follows later as tr(U^T C U) without another pass. Only the base model runs: the LM
head (a 262k-token vocabulary for Gemma-3) is not needed here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from cps.data.calibration import token_stream
from cps.data.corpus import Document
from cps.errors import CpsError
from cps.evaluation.perplexity import score_chunks
from cps.models import decoder_layers
from cps.pruning.engine import layer_output


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
    tokens: int
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


def _chunks(tokenizer, documents: list[Document], seqlen: int) -> list[torch.Tensor]:
    stream, _ = token_stream(documents, tokenizer)
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return score_chunks(stream, seqlen, start)


@contextmanager
def _hooks(modules: list[nn.Module], record: Callable[[int, torch.Tensor], None]) -> Iterator[None]:
    handles = [
        module.register_forward_hook(lambda m, args, out, i=i: record(i, layer_output(out)))
        for i, module in enumerate(modules)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.inference_mode()
def activation_statistics(
    model: nn.Module, tokenizer, documents: list[Document], seqlen: int = 1024
) -> ActivationStats:
    layers = decoder_layers(model)
    acts = [activation_module(layer) for layer in layers]
    device = next(model.parameters()).device
    active: list[torch.Tensor | None] = [None] * len(layers)
    hidden: list[torch.Tensor | None] = [None] * len(layers)
    tokens = 0

    def add(store: list, index: int, value: torch.Tensor) -> None:
        store[index] = value if store[index] is None else store[index] + value

    def on_act(i: int, out: torch.Tensor) -> None:
        add(active, i, (out > 0).reshape(-1, out.shape[-1]).sum(0).double().cpu())

    def on_layer(i: int, out: torch.Tensor) -> None:
        add(hidden, i, out.reshape(-1, out.shape[-1]).double().sum(0).cpu())

    with _hooks(acts, on_act), _hooks(list(layers), on_layer):
        for chunk in _chunks(tokenizer, documents, seqlen):
            model.base_model(input_ids=chunk[None].to(device), use_cache=False)  # no LM head needed
            tokens += len(chunk)
    return ActivationStats(tokens, torch.stack(active), torch.stack(hidden))  # type: ignore[arg-type]


@torch.inference_mode()
def deviation_statistics(
    model: nn.Module, reference: nn.Module, tokenizer, documents: list[Document], seqlen: int = 1024
) -> DeviationStats:
    """Layer outputs of `model` against `reference` (e.g. pruned vs dense) on the same tokens."""
    count = len(decoder_layers(reference))
    captured: dict[int, torch.Tensor] = {}
    signal = torch.zeros(count, dtype=torch.float64)
    noise = torch.zeros(count, dtype=torch.float64)
    second: torch.Tensor | None = None
    tokens = 0

    def keep(i: int, out: torch.Tensor) -> None:
        captured[i] = out.reshape(-1, out.shape[-1]).double().cpu()

    def compare(i: int, out: torch.Tensor) -> None:
        nonlocal second
        ref = captured.pop(i)
        delta = out.reshape(-1, out.shape[-1]).double().cpu() - ref
        signal[i] += (ref**2).sum()
        noise[i] += (delta**2).sum()
        if second is None:
            second = torch.zeros(count, delta.shape[1], delta.shape[1], dtype=torch.float64)
        second[i] += delta.T @ delta

    ref_device = next(reference.parameters()).device
    device = next(model.parameters()).device
    for chunk in _chunks(tokenizer, documents, seqlen):
        with _hooks(list(decoder_layers(reference)), keep):
            reference.base_model(input_ids=chunk[None].to(ref_device), use_cache=False)
        with _hooks(list(decoder_layers(model)), compare):
            model.base_model(input_ids=chunk[None].to(device), use_cache=False)
        tokens += len(chunk)
    return DeviationStats(tokens, signal, noise, second)  # type: ignore[arg-type]
