"""OWL's layer sparsities three ways on the embedded Gemma-3 270M: cps, luuyin/OWL, llm-compressor.

    .venv/bin/python benchmarks/owl_reference.py [--nsamples 8 --seqlen 256 --sparsity 0.7]

cps (`engine.outlier_ratios` + `owl.owl_sparsities`) against two transcriptions, on the same
Swahili NTREX calibration windows (`cps.data.calibration`), in float32 on the CPU:
  - luuyin/OWL `prune_wanda_outlier` (lib/prune_all.py), its first loop: each decoder layer run one
    sample at a time on the dense model's activations, `WrappedGPT.scaler_row` (lib/layerwrapper.py:
    the running mean over samples of each sample's sum of squares) gathered by forward hooks,
    W_metric = |W| * sqrt(scaler_row), `check_outlier_mean` on the layer's concatenated scores,
    then the numpy rescaling and `1 - ratio` with its floor of 0.01 (from its second loop). Its
    second loop, per-row Wanda at each layer's sparsity on the inputs of the pruned model, is
    `luuyin_prune` (tests/test_owl.py compares cps's masks with it);
  - llm-compressor 0.14 `_infer_owl_layer_sparsity` and `_get_activations` (modifiers/pruning/
    sparsegpt/sgpt_base.py): one full dense forward per sample with pre-hooks summing
    (1/128) * sqrt(sum of x^2 over the sample's tokens) per column, the mean over samples of each
    sample's ||X_j|| up to a constant factor (luuyin and cps take the root of the mean of squares).

The transcriptions live here only; tests/test_owl.py imports them. Prints per layer D_l (percent)
and S_l for each, and the largest differences; exits 1 when cps and luuyin differ by more than
1e-6 in any S_l. That check runs cps with one window per forward (`batch_tokens` = seqlen), the
reference's batching. With the engine's default (up to 2048 tokens, 8 windows here, per forward)
the layers' inputs round differently (batched matrix products), and a score within that noise of
its threshold M x mean can fall on the other side: the count differences per layer are printed
as well (measured: 4 of Gemma-3's 5.57M scores in layer 13, S_l off by 2.9e-6).
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

TOLERANCE = 1e-6  # cps against luuyin/OWL: the same statistic, up to float summation order
LLMC_NSAMPLES = 128  # `_get_activations(..., nsamples=128)`: a constant divisor, whatever the count


@dataclass
class LayerCall:
    """One decoder layer's call on one sample, as the model's own forward made it."""

    args: tuple  # positional arguments after the hidden states
    kwargs: dict[str, Any]


def find_layers(module: nn.Module) -> dict[str, nn.Linear]:
    """luuyin's `find_layers(layer)`: the layer's nn.Linear modules by name (exact type match)."""
    return {name: child for name, child in module.named_modules() if type(child) is nn.Linear}


def decoder_layer_list(model: nn.Module) -> nn.ModuleList:
    """`model.model.layers`, as both references index them (Llama, Gemma-3 text models)."""
    return model.model.layers


def record_layer_calls(
    model: nn.Module, input_ids: torch.Tensor
) -> tuple[list[torch.Tensor], list[list[LayerCall]]]:
    """luuyin's `prepare_calibration_input` per layer: the layer-0 inputs of every sample (1, L, d)
    and every layer's call arguments per sample, recorded by pre-hooks during the model's own
    forward, one sample at a time. The reference takes layer 0's mask and positions for all
    layers; Gemma-3 alternates sliding and full attention, so each layer keeps its own."""
    layers = decoder_layer_list(model)
    inputs: list[torch.Tensor] = []
    calls: list[list[LayerCall]] = [[] for _ in layers]

    def recorder(index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            kwargs = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values")}
            hidden, rest = (args[0], args[1:]) if args else (kwargs.pop("hidden_states"), ())
            if index == 0:
                inputs.append(hidden.detach().clone())
            calls[index].append(LayerCall(rest, kwargs))

        return hook

    handles = [
        layer.register_forward_pre_hook(recorder(i), with_kwargs=True) for i, layer in enumerate(layers)
    ]
    _forward_each_sample(model, input_ids, handles)
    return inputs, calls


def run_layer(layer: nn.Module, hidden: torch.Tensor, call: LayerCall) -> torch.Tensor:
    """`layer(inps[j].unsqueeze(0), ...)[0]`, with the layer's own arguments."""
    output = layer(hidden, *call.args, **call.kwargs)
    return output[0] if isinstance(output, tuple) else output


class WrappedGPT:
    """lib/layerwrapper.py's statistic: scaler_row, the running mean over samples of the per-sample
    sum of squares of each input column."""

    def __init__(self, layer: nn.Linear) -> None:
        self.layer = layer
        self.scaler_row = torch.zeros(layer.weight.shape[1], device=layer.weight.device)
        self.nsamples = 0

    def add_batch(self, inp: torch.Tensor) -> None:
        if len(inp.shape) == 2:
            inp = inp.unsqueeze(0)
        count = inp.shape[0]
        if len(inp.shape) == 3:
            inp = inp.reshape((-1, inp.shape[-1]))
        inp = inp.t()
        self.scaler_row *= self.nsamples / (self.nsamples + count)
        self.nsamples += count
        inp = inp.type(torch.float32)
        self.scaler_row += torch.norm(inp, p=2, dim=1) ** 2 / self.nsamples


def _wrapped_pass(
    layer: nn.Module, inps: list[torch.Tensor], calls: Sequence[LayerCall]
) -> tuple[dict[str, nn.Linear], dict[str, WrappedGPT]]:
    """One hooked pass of a layer over every sample (the outputs are recomputed afterwards, as
    the reference does)."""
    subset = find_layers(layer)
    wrapped = {name: WrappedGPT(module) for name, module in subset.items()}

    def add_batch(name: str) -> Callable[..., None]:
        def hook(_: nn.Module, inp: tuple, out: torch.Tensor) -> None:
            wrapped[name].add_batch(inp[0].data)

        return hook

    handles = [subset[name].register_forward_hook(add_batch(name)) for name in wrapped]
    try:
        for j, hidden in enumerate(inps):
            run_layer(layer, hidden, calls[j])
    finally:
        for handle in handles:
            handle.remove()
    return subset, wrapped


def check_outlier_mean(W: torch.Tensor, threshold: float) -> float:
    """lib/prune_all.py `check_outlier_mean`: percent of entries above threshold x their mean."""
    max_shred = torch.mean(W) * threshold
    return float((W > max_shred).sum().item()) / W.numel() * 100  # noqa: SIM300 (W: a tensor)


def luuyin_rescale(ratios: Sequence[float], sparsity: float, lam: float) -> list[float]:
    """The reference's numpy rescaling, then each layer's `1 - all_layer_ratio[i]`, 0.01 if <= 0."""
    all_layer_ratio = np.array(ratios)
    all_layer_ratio = (all_layer_ratio - all_layer_ratio.min()) * (
        1 / (all_layer_ratio.max() - all_layer_ratio.min()) * lam * 2
    )
    all_layer_ratio = all_layer_ratio - np.mean(all_layer_ratio) + (1 - sparsity)
    layers = []
    for density in all_layer_ratio:
        layer_sparsity_ratio = 1 - density
        if layer_sparsity_ratio <= 0:
            layer_sparsity_ratio = 0.01
        layers.append(float(layer_sparsity_ratio))
    return layers


def luuyin_outlier_ratios(
    model: nn.Module, inps: list[torch.Tensor], calls: list[list[LayerCall]], m: float
) -> list[float]:
    """The first loop of `prune_wanda_outlier`: each layer's D_l on the dense model's activations."""
    all_layer_ratio = []
    with torch.no_grad():
        for i, layer in enumerate(decoder_layer_list(model)):
            subset, wrapped = _wrapped_pass(layer, inps, calls[i])
            layer_wmetric = [
                torch.abs(subset[name].weight.data) * torch.sqrt(wrapped[name].scaler_row.reshape((1, -1)))
                for name in subset
            ]
            inps = [run_layer(layer, hidden, calls[i][j]) for j, hidden in enumerate(inps)]
            layer_wmetric = torch.cat([torch.flatten(x.cpu()) for x in layer_wmetric])
            all_layer_ratio.append(check_outlier_mean(layer_wmetric, m))
    return all_layer_ratio


def luuyin_prune(
    model: nn.Module, inps: list[torch.Tensor], calls: list[list[LayerCall]], sparsities: Sequence[float]
) -> dict[str, torch.Tensor]:
    """The second loop of `prune_wanda_outlier` (unstructured, no variant), in place: each layer's
    statistics on the inputs the pruned earlier layers produce, per-row Wanda at the layer's
    sparsity (a stable sort's first int(in * s_l)). Returns the masks, True = pruned."""
    masks = {}
    prefix = {id(layer): name for name, layer in model.named_modules()}
    with torch.no_grad():
        for i, layer in enumerate(decoder_layer_list(model)):
            subset, wrapped = _wrapped_pass(layer, inps, calls[i])
            for name in subset:
                W_metric = torch.abs(subset[name].weight.data) * torch.sqrt(
                    wrapped[name].scaler_row.reshape((1, -1))
                )
                W_mask = torch.zeros_like(W_metric) == 1
                sort_res = torch.sort(W_metric, dim=-1, stable=True)
                indices = sort_res[1][:, : int(W_metric.shape[1] * sparsities[i])]
                W_mask.scatter_(1, indices, True)
                subset[name].weight.data[W_mask] = 0
                masks[f"{prefix[id(layer)]}.{name}"] = W_mask
            inps = [run_layer(layer, hidden, calls[i][j]) for j, hidden in enumerate(inps)]
    return masks


def llmcompressor_activations(model: nn.Module, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """`_get_activations`: one full dense forward per sample (a batch of 1), pre-hooks adding
    (1/128) * sqrt(sum over the sample's tokens of x^2) per input column of every linear."""
    acts: dict[str, Any] = defaultdict(int)

    def save_acts(name: str) -> Callable[..., None]:
        def hook(_: nn.Module, input: Any) -> None:
            if isinstance(input, tuple):
                input = input[0]
            acts[name] += 1.0 / LLMC_NSAMPLES * input.pow(2).sum(dim=(0, 1)).sqrt()

        return hook

    handles = [
        module.register_forward_pre_hook(save_acts(name))
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and "lm_head" not in name
    ]
    _forward_each_sample(model, input_ids, handles)
    return dict(acts)


def llmcompressor_outlier_ratios(model: nn.Module, acts: dict[str, torch.Tensor], m: float) -> list[float]:
    """`_infer_owl_layer_sparsity`'s outlier ratios: each decoder layer's scores |W| * acts of all
    its linears concatenated, the percent above m times their mean."""
    prefix = {id(layer): name for name, layer in model.named_modules()}
    outlier_ratios = []
    with torch.no_grad():
        for layer in decoder_layer_list(model):
            name = prefix[id(layer)]
            prunable = {n: mod for n, mod in layer.named_modules() if isinstance(mod, nn.Linear)}
            z = [mod.weight.abs() * acts[f"{name}.{n}"].unsqueeze(0) for n, mod in prunable.items()]
            group = torch.cat([item.flatten().cpu() for item in z])
            threshold = torch.mean(group) * m
            outlier_ratios.append(100 * (group > threshold).sum().item() / group.numel())
    return outlier_ratios


def llmcompressor_rescale(ratios: Sequence[float], sparsity: float, lam: float) -> list[float]:
    """`_infer_owl_layer_sparsity`'s rescaling: no floor."""
    arr = np.array(ratios)
    rescaled = [(r - arr.min()) * (1 / (arr.max() - arr.min()) * lam * 2) for r in ratios]
    mean = np.mean(np.array(rescaled))
    return [float(1 - (r - mean + (1 - float(sparsity)))) for r in rescaled]


def _table(rows: dict[str, tuple[list[float], list[float]]]) -> None:
    names = list(rows)
    print(f"{'layer':>5} " + " ".join(f"{'D ' + n:>14} {'S ' + n:>10}" for n in names))
    for index in range(len(rows[names[0]][0])):
        cells = " ".join(f"{rows[n][0][index]:>14.6f} {rows[n][1][index]:>10.6f}" for n in names)
        print(f"{index:>5} {cells}")


def _largest(a: Sequence[float], b: Sequence[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--lam", type=float, default=0.08)
    parser.add_argument("--m", type=float, default=5.0)
    args = parser.parse_args()

    import cps  # noqa: F401  # first, as in `cps ...`: its allocator setting precedes torch's first tensor

    # isort: split
    from cps.config import CalibrationConfig
    from cps.data.calibration import build_calibration
    from cps.models import LoadOptions, load_model
    from cps.pruning.engine import EngineConfig, outlier_ratios
    from cps.pruning.owl import owl_sparsities

    loaded = load_model(args.model, LoadOptions("float32", "cpu"))
    model = loaded.model
    calib = build_calibration(
        CalibrationConfig(args.model, "sw", "ntrex", args.nsamples, args.seqlen, seed=0), loaded.tokenizer
    )
    ids = calib.input_ids
    print(f"{args.model}, {ids.shape[0]} x {ids.shape[1]} sw NTREX tokens (seed 0), float32 CPU")
    print(f"S = {args.sparsity:g}, lambda = {args.lam:g}, M = {args.m:g}")

    cps_ratios = outlier_ratios(model, ids, EngineConfig(batch_tokens=ids.shape[1]), args.m)
    cps_layers = owl_sparsities(cps_ratios, args.sparsity, args.lam)
    batched_ratios = outlier_ratios(model, ids, EngineConfig(), args.m)
    batched_layers = owl_sparsities(batched_ratios, args.sparsity, args.lam)
    inps, calls = record_layer_calls(model, ids)
    luuyin_ratios = luuyin_outlier_ratios(model, inps, calls, args.m)
    luuyin_layers = luuyin_rescale(luuyin_ratios, args.sparsity, args.lam)
    llmc_ratios = llmcompressor_outlier_ratios(model, llmcompressor_activations(model, ids), args.m)
    llmc_layers = llmcompressor_rescale(llmc_ratios, args.sparsity, args.lam)

    rows = {
        "cps": (cps_ratios, cps_layers),
        "luuyin": (luuyin_ratios, luuyin_layers),
        "llmc": (llmc_ratios, llmc_layers),
    }
    print("cps: one window per forward (the reference's batching); D in percent")
    _table(rows)
    against_luuyin = _largest(cps_layers, luuyin_layers)
    print(f"max |D cps - D luuyin| = {_largest(cps_ratios, luuyin_ratios):.3g} points")
    print(f"max |S cps - S luuyin| = {against_luuyin:.3g} (bound {TOLERANCE:g})")
    print(f"max |D cps - D llm-compressor| = {_largest(cps_ratios, llmc_ratios):.3g} points")
    print(f"max |S cps - S llm-compressor| = {_largest(cps_layers, llmc_layers):.3g}")
    means = {name: float(np.mean(layers)) for name, (_, layers) in rows.items()}
    print("mean S: " + ", ".join(f"{name} {mean:.9f}" for name, mean in means.items()))
    counts = _count_differences(model, batched_ratios, luuyin_ratios)
    print(
        f"cps at its default batch_tokens {EngineConfig().batch_tokens}: "
        f"max |S cps - S luuyin| = {_largest(batched_layers, luuyin_layers):.3g}, "
        f"outlier counts cps - luuyin by layer {counts or 'none'}"
    )
    if against_luuyin > TOLERANCE:
        print(f"FAIL: cps departs from luuyin/OWL by {against_luuyin:.3g} > {TOLERANCE:g}")
        return 1
    return 0


def _count_differences(model: nn.Module, ratios: Sequence[float], others: Sequence[float]) -> dict[int, int]:
    """Per layer, how many more scores one side counts above M x mean than the other."""
    sizes = [
        sum(linear.weight.numel() for linear in find_layers(layer).values())
        for layer in decoder_layer_list(model)
    ]
    counts = {
        index: round((a - b) * size / 100)
        for index, (a, b, size) in enumerate(zip(ratios, others, sizes, strict=True))
    }
    return {index: count for index, count in counts.items() if count}


if __name__ == "__main__":
    sys.exit(main())


def _forward_each_sample(model: nn.Module, input_ids: torch.Tensor, handles: list) -> None:
    """The model's own forward on one calibration window at a time (both references' batching),
    then the hooks removed."""
    try:
        with torch.no_grad():
            for j in range(input_ids.shape[0]):
                model(input_ids[j : j + 1], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
