"""Activation statistics on held-out text against independent recomputation."""

from __future__ import annotations

import pytest
import torch

from cps.data import get_corpus
from cps.evaluation.activations import activation_module, activation_statistics, deviation_statistics
from cps.models import decoder_layers, load_model


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3", "tiny-cohere"])
def test_firing_counts_and_hidden_sums_match_a_recomputation(name):
    loaded = load_model(name)
    documents = get_corpus("flores").documents("sw")[:3]
    stats = activation_statistics(loaded.model, loaded.tokenizer, documents, seqlen=64)
    layers = decoder_layers(loaded.model)
    # independently: act_fn applied to gate_proj's output, and HF's own hidden states
    gate_outputs: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(layers))}
    handles = [
        layer.mlp.gate_proj.register_forward_hook(lambda m, a, out, i=i: gate_outputs[i].append(out))
        for i, layer in enumerate(layers)
    ]
    from cps.evaluation.activations import _chunks

    hidden_sums = torch.zeros(len(layers), loaded.model.config.hidden_size, dtype=torch.float64)
    tokens = 0
    with torch.no_grad():
        for chunk in _chunks(loaded.tokenizer, documents, 64):
            states = loaded.model(chunk[None], output_hidden_states=True).hidden_states
            for i in range(len(layers) - 1):  # HF's last entry is after the final norm
                hidden_sums[i] += states[i + 1][0].double().sum(0)
            tokens += len(chunk)
    for handle in handles:
        handle.remove()
    assert stats.tokens == tokens
    for i, layer in enumerate(layers):
        fired = sum(
            (activation_module(layer)(out) > 0).reshape(-1, out.shape[-1]).sum(0) for out in gate_outputs[i]
        )
        assert torch.equal(stats.active[i], fired.double())
    assert torch.allclose(stats.hidden_sum[:-1], hidden_sums[:-1], rtol=1e-5, atol=1e-4)
    assert ((stats.probabilities >= 0) & (stats.probabilities <= 1)).all()


def test_deviation_against_itself_is_zero_and_against_a_pruned_model_is_not():
    dense = load_model("tiny-qwen2")
    pruned = load_model("tiny-qwen2").model
    with torch.no_grad():
        for module in pruned.modules():
            if isinstance(module, torch.nn.Linear) and module is not pruned.lm_head:
                module.weight.mul_(torch.rand_like(module.weight) > 0.5)
    documents = get_corpus("flores").documents("en")[:2]
    same = deviation_statistics(dense.model, dense.model, dense.tokenizer, documents, seqlen=48)
    assert (same.noise == 0).all() and (same.signal > 0).all()
    changed = deviation_statistics(pruned, dense.model, dense.tokenizer, documents, seqlen=48)
    assert (changed.noise > 0).all() and torch.equal(changed.signal, same.signal)
    traces = torch.diagonal(changed.second_moment, dim1=1, dim2=2).sum(-1)
    assert torch.allclose(traces, changed.noise)  # tr(sum delta delta^T) = sum ||delta||^2
