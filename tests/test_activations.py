"""Activation statistics on held-out text against independent recomputation, window by window."""

from __future__ import annotations

import pytest
import torch

from cps.data import get_corpus
from cps.evaluation.activations import activation_module, activation_statistics
from cps.evaluation.hidden import PositionSample
from cps.evaluation.windows import held_out_windows
from cps.models import decoder_layers, load_model


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3", "tiny-cohere"])
def test_firing_counts_and_hidden_sums_match_a_recomputation(name, tiny_bos_tokenizer):
    loaded = load_model(name)
    tokenizer = tiny_bos_tokenizer  # every window starts with BOS, which is never counted
    text = held_out_windows(get_corpus("flores").documents("sw")[:3], tokenizer, seqlen=40)
    stats, deviation, recorded = activation_statistics(loaded.model, text)
    assert deviation is None and recorded is None
    layers = decoder_layers(loaded.model)
    # independently, one window at a time: act_fn applied to gate_proj's output, and the layer outputs
    fired = torch.zeros_like(stats.active)
    hidden_sums = torch.zeros_like(stats.hidden_sum)
    for window in text.windows:
        gates, outputs = [], []
        handles = [
            layer.mlp.gate_proj.register_forward_hook(lambda m, a, out, g=gates: g.append(out))
            for layer in layers
        ]
        handles += [
            layer.register_forward_hook(lambda m, a, out, o=outputs: o.append(out)) for layer in layers
        ]
        with torch.no_grad():
            loaded.model(window.input_ids[None])
        for handle in handles:
            handle.remove()
        assert window.input_ids[0] == tokenizer.bos_token_id
        for i, layer in enumerate(layers):
            scored = slice(len(window.input_ids) - window.scored, None)  # never position 0 (BOS)
            fired[i] += (activation_module(layer)(gates[i][0, scored]) > 0).sum(0).double()
            output = outputs[i][0] if isinstance(outputs[i], tuple) else outputs[i]
            hidden_sums[i] += output[0, scored].double().sum(0)
    assert stats.tokens == sum(w.scored for w in text.windows) == sum(text.tokens)
    assert torch.equal(stats.active, fired)
    assert torch.allclose(stats.hidden_sum, hidden_sums, rtol=1e-5, atol=1e-4)
    assert ((stats.probabilities >= 0) & (stats.probabilities <= 1)).all()


def test_deviation_against_itself_is_zero_and_against_a_pruned_model_is_not(tiny_tokenizer):
    dense = load_model("tiny-qwen2")
    pruned = load_model("tiny-qwen2").model
    with torch.no_grad():
        for module in pruned.modules():
            if isinstance(module, torch.nn.Linear) and module is not pruned.lm_head:
                module.weight.mul_(torch.rand_like(module.weight) > 0.5)
    text = held_out_windows(get_corpus("flores").documents("en")[:2], tiny_tokenizer, seqlen=48)
    sample = PositionSample.of(text, every=3)
    _, _, states = activation_statistics(dense.model, text, record=sample)
    assert states is not None and states.shape[:2] == (2, sample.size)
    _, same, _ = activation_statistics(dense.model, text, reference=(sample, states))
    assert (same.noise == 0).all() and (same.signal > 0).all() and same.tokens == sample.size
    _, changed, _ = activation_statistics(pruned, text, reference=(sample, states))
    assert (changed.noise > 0).all() and torch.equal(changed.signal, same.signal)
    traces = torch.diagonal(changed.second_moment, dim1=1, dim2=2).sum(-1)
    assert torch.allclose(traces, changed.noise)  # tr(sum delta delta^T) = sum ||delta||^2
