"""The sequential layer-by-layer pruning loop shared by every method (and by activation analyses).

For each decoder layer:
  1. dense pass: the layer runs on all calibration inputs with pre-hooks on its linears that sum
     H = X^T X (fp32) per distinct input (q/k/v share one, gate/up share one); the pass stops at the
     last new input, since its outputs are never used;
  2. the method turns (W, H) into a mask (and, for SparseGPT, new weights); the engine applies it;
  3. pruning error ||WX - W'X||^2 = tr(dW H dW^T) and signal ||WX||^2 = tr(W H W^T) come from the
     same H, on the same inputs, without another pass. A method that reads only the squared column
     norms of X (Wanda, magnitude) gets only those: summing X^T X would cost it a quarter of a
     dense pass. Its error and signal are then estimated from a fixed, seeded sample of the
     calibration tokens (`TokenSample`: every window's first token, plus `error_sample` of the
     others drawn uniformly without replacement and weighted by the inverse of their sampling
     rate; the estimator is unbiased for both sums, and the same tokens serve every layer);
  4. pruned pass: the pruned layer maps the inputs to the next layer's inputs.
With `true_sequential`, each group of linears that reads one input (attention in, attention out, MLP
in, MLP out) is pruned in execution order, its statistics gathered after the earlier groups were
pruned. Each layer gets its own call arguments (attention masks, position embeddings), captured
from the model's own forward: Gemma-3 alternates sliding and full attention layers.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from cps.hooks import layer_output
from cps.models import decoder_layers
from cps.pruning.base import InputStats, MaskRefinement, PruningMethod
from cps.pruning.masks import PackedMasks, SparsityTarget
from cps.pruning.owl import outlier_ratio, owl_sparsities
from cps.pruning.quant import QuantParams
from cps.pruning.wanda import wanda_scores
from cps.streaming import LayerCalls, capture_layer_calls, move, return_freed_memory, streamed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    device: str = "cpu"  # where each layer and its activations are computed
    true_sequential: bool = False
    offload_activations: bool = False  # every window's activations in files between layers
    batch_tokens: int = 2048  # calibration tokens per forward batch (smaller: less transient memory)
    # Tokens whose inputs estimate error and signal for a method that does not need X^T X (the
    # windows' first tokens come on top); None: exact, the full X^T X for every method.
    error_sample: int | None = 512


@dataclass
class LinearStats:
    layer: int
    module: str  # name inside the decoder layer, e.g. self_attn.q_proj
    error: float  # ||WX - W'X||_F^2 over the calibration tokens
    signal: float  # ||WX||_F^2
    sparsity: float  # share of pruned weights (the mask)
    stored_sparsity: float = 0.0  # share of zeros in the stored weights after pruning
    shape: tuple[int, int] = (0, 0)  # (out, in)

    @property
    def snr_db(self) -> float:
        if self.error <= 0:
            return math.inf
        return 10 * math.log10(self.signal / self.error)


@dataclass
class EngineResult:
    masks: PackedMasks  # full module name -> bool mask (kept bit-packed), True = pruned
    stats: list[LinearStats] = field(default_factory=list)
    seconds: float = 0.0
    error_estimate: str = "exact"  # or "sample:<tokens>/<all tokens>" (see `TokenSample`)
    layer_targets: list[float] | None = None  # OWL: each layer's allocated sparsity
    outlier_ratios: list[float] | None = None  # OWL: each layer's D_l (percent)
    block_influence: list[float] | None = None  # layer removal: each layer's Block Influence
    removed_layers: list[int] | None = None  # layer removal: the removed decoder layers
    quant: dict[str, QuantParams] = field(default_factory=dict)  # full module name -> its grid


@dataclass
class TokenSample:
    """Which calibration tokens estimate error and signal: per forward batch, the flat row indices
    (b * L) of the sampled tokens and the square root of their weights (1 for the windows' first
    tokens, taken whole; N_rest / k for the k tokens drawn from the N_rest others)."""

    rows: list[torch.Tensor]
    roots: list[torch.Tensor]
    size: int
    total: int

    @classmethod
    def draw(cls, batches: list[torch.Tensor], size: int, seed: int = 0) -> TokenSample:
        lengths = [batch.numel() for batch in batches]
        offsets = [0, *itertools.accumulate(lengths)]
        first = torch.zeros(offsets[-1], dtype=torch.bool)  # each window's first token
        for batch, offset in zip(batches, offsets, strict=False):
            first[offset : offset + batch.numel() : batch.shape[1]] = True
        rest = (~first).nonzero().squeeze(1)
        k = min(size, rest.numel())
        drawn = rest[torch.randperm(rest.numel(), generator=torch.Generator().manual_seed(seed))[:k]]
        weight = torch.zeros(offsets[-1], dtype=torch.float64)
        weight[first] = 1.0
        weight[drawn] = rest.numel() / max(k, 1)
        rows, roots = [], []
        for start, stop in itertools.pairwise(offsets):
            rows.append(weight[start:stop].nonzero().squeeze(1))
            roots.append(weight[start:stop][rows[-1]].sqrt().float())
        return cls(rows, roots, int(first.sum()) + k, offsets[-1])

    @property
    def label(self) -> str:
        return "exact" if self.size >= self.total else f"sample:{self.size}/{self.total}"


class _StopForward(Exception):
    """Raised from a hook once a pass has seen everything it needs."""


# ---------------------------------------------------------------------------------------------
# One layer


def _linears(layer: nn.Module) -> dict[str, nn.Linear]:
    return {name: module for name, module in layer.named_modules() if isinstance(module, nn.Linear)}


@dataclass
class _Group:
    """Linears that read one input tensor, in execution order."""

    names: list[str]
    gram: torch.Tensor | None = None  # upper triangle of X^T X (methods that need it)
    squares: torch.Tensor | None = None  # sum of X_tj^2 per column (the others)
    sample: list[torch.Tensor] = field(default_factory=list)  # weighted sampled rows of X
    tokens: int = 0
    sums: torch.Tensor | None = None  # sum of X_tj per column (a refinement's first moments)
    window_var: torch.Tensor | None = None  # sum over windows of each window's variance of X_j
    windows: int = 0


def accumulate_upper_gram(gram: torch.Tensor, X: torch.Tensor) -> None:
    """gram += X^T X on and above the diagonal (X: tokens x in), in row panels of the upper
    triangle (128 rows up to 1024 inputs, else 256; measured on 2 CPU cores: 0.67x the time of
    the full product at 640 inputs, 0.62x at 2048). `symmetrize` fills in the lower triangle once
    all batches are in. (BLAS syrk through scipy was measured slower inside the forward passes:
    its thread pool competes with torch's.)"""
    width = X.shape[1]
    if width < 512:
        gram.addmm_(X.T, X)
        return
    panel = 128 if width <= 1024 else 256
    for start in range(0, width, panel):
        stop = min(start + panel, width)
        gram[start:stop, start:].addmm_(X[:, start:stop].T, X[:, start:])


def symmetrize(gram: torch.Tensor) -> torch.Tensor:
    """The full X^T X from its upper triangle (exact for the full-matmul case too)."""
    return torch.triu(gram) + torch.triu(gram, diagonal=1).T


class _StatsHooks:
    """Pre-hooks on a layer's linears that find the input groups and sum X^T X for some of them.

    Groups are found in the first batch (by input tensor: linears called on the same tensor share
    it); from then on the layout is fixed. References to the batch's inputs are held until the batch
    ends, so the allocator cannot reuse an address and merge two groups by mistake.
    """

    def __init__(
        self,
        layer: nn.Module,
        layout: list[list[str]] | None = None,
        squares: bool = False,
        sample: TokenSample | None = None,
        moments: bool = False,
        gram: bool = True,
    ) -> None:
        self.gram = gram  # sum X^T X where no sample is drawn (off: a pass that reads only squares)
        self.squares = squares  # sum each column's squares (what a method without X^T X reads)
        self.sample = sample  # None: sum the full X^T X (exact error and signal); else sampled rows
        self.moments = moments  # column sums and per-window variances (a refinement reads them)
        self.stop_early = True  # end a pass at the last input it gathers (its outputs are unused)
        self.batch = 0
        self.linears = _linears(layer)
        self.groups = [_Group(list(names)) for names in layout or []]
        self.frozen = layout is not None  # a known layout lets the very first batch stop early
        self.active: set[int] = set()  # indices of groups to accumulate; a pass ends after the last
        self._seen: dict[tuple, tuple[torch.Tensor, int]] = {}
        self._handles = [
            module.register_forward_pre_hook(self._hook(name)) for name, module in self.linears.items()
        ]

    def _hook(self, name: str) -> Callable[..., None]:
        def collect(module: nn.Module, args: tuple) -> None:
            x = args[0]
            key = (x.data_ptr(), tuple(x.shape), x.dtype)
            if key in self._seen:
                if not self.frozen:
                    self.groups[self._seen[key][1]].names.append(name)
                return
            if not self.frozen:
                self.groups.append(_Group([]))
            index = len(self._seen)
            self._seen[key] = (x, index)
            group = self.groups[index]
            if not self.frozen:
                group.names.append(name)
            if index in self.active:
                flat = x.reshape(-1, x.shape[-1]).float()  # (tokens, in)
                group.tokens += flat.shape[0]
                if self.squares:
                    squares = flat.mul(flat).sum(dim=0)  # 5-10x faster than vector_norm(dim=0) on CPU
                    group.squares = squares if group.squares is None else group.squares.add_(squares)
                if self.moments:
                    _add_moments(group, x.reshape(-1, x.shape[-2], x.shape[-1]).float())
                if self.sample is None and self.gram:
                    if group.gram is None:
                        group.gram = flat.new_zeros(flat.shape[1], flat.shape[1])
                    accumulate_upper_gram(group.gram, flat)
                elif self.sample is not None:
                    rows = self.sample.rows[self.batch].to(flat.device)
                    roots = self.sample.roots[self.batch].to(flat.device)
                    group.sample.append(flat[rows] * roots[:, None])
            if self.stop_early and self.frozen and index == max(self.active):
                raise _StopForward  # nothing after this input is needed

        return collect

    @property
    def layout(self) -> list[list[str]]:
        return [group.names for group in self.groups]

    def run(self, forward: Callable[[torch.Tensor], Any], batches: Any) -> None:
        """One pass over `batches`; where `stop_early` is off, each batch's output replaces it
        (`batches` is then the buffer of the next layer's inputs)."""
        if self.frozen:
            self.active &= set(range(len(self.groups)))
        for self.batch, batch in enumerate(batches):
            with suppress(_StopForward):
                output = forward(batch)
                if not self.stop_early:
                    batches[self.batch] = output.to(batch.device)
            self._seen.clear()
            if not self.frozen:
                self.frozen = True
                self.active &= set(range(len(self.groups)))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _add_moments(group: _Group, windows: torch.Tensor) -> None:
    """Column sums and the sum of per-window population variances, from X (windows, L, in)."""
    sums = windows.sum(dim=(0, 1))
    variance = torch.var(windows, dim=1, unbiased=False).sum(dim=0)
    group.sums = sums if group.sums is None else group.sums.add_(sums)
    group.window_var = variance if group.window_var is None else group.window_var.add_(variance)
    group.windows += windows.shape[0]


def _input_stats(group: _Group, gram: torch.Tensor | None) -> InputStats:
    window_var = None if group.window_var is None else group.window_var / max(group.windows, 1)
    return InputStats(gram, group.tokens, group.squares, group.sums, window_var, group.windows)


@dataclass
class _Applied:
    """What pruning (and quantizing) did to one linear."""

    mask: torch.Tensor  # bool (out, in), True = pruned
    error: float  # ||WX - W'X||^2 over the calibration tokens (or its estimate)
    signal: float  # ||WX||^2
    stored: float  # share of zeros in the stored weights
    quant: QuantParams | None = None


def _prune_group(group: _Group, layer: nn.Module, step: _LayerStep) -> dict[str, _Applied]:
    """Prune every linear of a group (then refine its mask, then quantize it); returns what was
    applied per name. Error and signal are exact from X^T X, or estimated from the weighted
    sampled rows."""
    method, target, refinement = step.method, step.target, step.refinement
    linears = _linears(layer)
    if group.gram is not None:
        gram = symmetrize(group.gram)
        group.gram = None  # free the accumulator before the (in, in) products below
        stats = _input_stats(group, gram)

        def energy(matrix: torch.Tensor) -> float:  # ||matrix X^T||_F^2 = tr(matrix H matrix^T)
            return torch.sum((matrix @ gram) * matrix).item()

    else:
        sample = torch.cat(group.sample)
        group.sample = []
        stats = _input_stats(group, None)

        def energy(matrix: torch.Tensor) -> float:
            return torch.sum((sample @ matrix.T) ** 2).item()

    results = {}
    weights = [linears[name].weight.data.float() for name in group.names]  # the weights when fp32
    # a method that updates weights works on its own copies; a mask-only one reads them as they are
    copies = [W.clone() for W in weights] if method.updates_weights else weights
    if step.held is not None and method.quantizes:  # a pruned run's model: its zeros held
        held = [step.held.get(name) for name in group.names]
        outcome = method.quantize_group(
            copies, stats, [m if m is None else m.to(W.device) for m, W in zip(held, weights, strict=True)]
        )
    else:
        outcome = method.prune_group(copies, stats, target)
    for name, W, pruned in zip(group.names, weights, outcome, strict=True):
        if refinement is not None:  # a mask-only method's mask (PruneConfig refuses the others)
            pruned.mask = refinement.refine(name, W, pruned.mask, stats, target)
    if step.quantizer is not None:  # the pruned weights quantized, their zeros held
        pruned_weights = [
            torch.where(p.mask, 0.0, W) if p.weight is None else p.weight
            for W, p in zip(weights, outcome, strict=True)
        ]
        quantized = step.quantizer.quantize_group(pruned_weights, stats, [p.mask for p in outcome])
        for pruned, done in zip(outcome, quantized, strict=True):
            pruned.weight, pruned.quant = done.weight, done.quant
    for name, W, pruned in zip(group.names, weights, outcome, strict=True):
        linear = linears[name]
        if pruned.weight is None:  # the stored weights lose exactly the masked values
            error, signal = energy(torch.where(pruned.mask.to(W.device), W, 0.0)), energy(W)
            linear.weight.data.masked_fill_(pruned.mask.to(W.device), 0)
        else:
            new_weight = pruned.weight.to(linear.weight.dtype)
            delta = W - new_weight.float()  # what the stored weights really change by
            error, signal = energy(delta), energy(W)
            linear.weight.data.copy_(new_weight)
        stored = 1.0 - torch.count_nonzero(linear.weight).item() / linear.weight.numel()
        quant = None if pruned.quant is None else pruned.quant.to("cpu")
        results[name] = _Applied(pruned.mask.cpu(), error, signal, stored, quant)
    return results


# ---------------------------------------------------------------------------------------------
# The loop


def calibration_batches(input_ids: torch.Tensor, batch_tokens: int) -> list[torch.Tensor]:
    size = max(1, batch_tokens // input_ids.shape[1])
    return [input_ids[start : start + size] for start in range(0, input_ids.shape[0], size)]


@contextmanager
def _on_device(layer: nn.Module, model: nn.Module, device: torch.device) -> Iterator[None]:
    """A layer's weights where it computes for the duration: read from the shards (streamed) and
    released after, or moved to `device` and back home."""
    source = streamed(model)
    if source is not None:
        source.materialize(layer)
    else:
        home = next(layer.parameters()).device
        layer.to(device)
    try:
        yield
    finally:
        if source is not None:
            source.release(layer)
        else:
            layer.to(home)


def _layer_forward(layer: nn.Module, index: int, calls: LayerCalls, device: torch.device) -> Callable:
    def forward(batch: torch.Tensor) -> torch.Tensor:
        hidden = batch.to(device)
        return layer_output(layer(hidden, **move(calls.kwargs_for(index, batch), device, {})))

    return forward


def prune_model(
    model: nn.Module,
    input_ids: torch.Tensor,
    method: PruningMethod,
    target: SparsityTarget,
    config: EngineConfig | None = None,
    on_layer: Callable[[int, nn.Module], None] | None = None,
    plan: PrunePlan | None = None,
) -> EngineResult:
    """Prune every linear inside the decoder layers of `model` in place, layer by layer: each at
    `target`, or at the layer's own sparsity from OWL's allocation (`plan.allocation`), each mask
    refined by `plan.refinement`; a method that removes whole layers goes by `remove_layers`.

    A streamed model (`cps.streaming`) has each layer read from its shards before it is pruned and
    dropped after `on_layer(index, layer)` has seen it (the shard writer); an in-memory model has
    each layer moved to the device and back."""
    config = config or EngineConfig()
    plan = plan or PrunePlan()
    if method.removes_layers:
        return remove_layers(model, input_ids, method, target, config, on_layer)
    started = time.perf_counter()
    prefix = {id(layer): name for name, layer in model.named_modules()}
    result = EngineResult(masks=PackedMasks())
    targets = [target] * len(decoder_layers(model))
    if plan.allocation is not None:
        ratios = outlier_ratios(model, input_ids, config, plan.allocation.m)
        sparsities = owl_sparsities(ratios, target.sparsity, plan.allocation.lam)
        targets = [SparsityTarget(sparsity) for sparsity in sparsities]
        result.outlier_ratios, result.layer_targets = ratios, sparsities
    layouts: dict[tuple[str, ...], list[list[str]]] = {}  # linear names -> input groups
    batches = calibration_batches(input_ids, config.batch_tokens)
    sample = None
    if not needs_gram(method, plan.quantizer) and config.error_sample is not None:
        sample = TokenSample.draw(batches, config.error_sample)
        result.error_estimate = sample.label

    def visit(index: int, layer: nn.Module, forward: Callable, hidden: Any) -> dict[str, str] | None:
        held = None
        if plan.held is not None:  # this layer's masks of the pruned run being quantized
            inside = f"{prefix[id(layer)]}."
            held = {name.removeprefix(inside): m for name, m in plan.held.items() if name.startswith(inside)}
        step = _LayerStep(method, targets[index], plan.refinement, sample, plan.quantizer, held)
        layer_stats = _prune_layer(layer, forward, hidden, step, config, layouts)
        if on_layer is not None:
            on_layer(index, layer)
        _record(result, index, prefix[id(layer)], layer_stats)
        finite = [s.snr_db for s in result.stats[-len(layer_stats) :] if math.isfinite(s.snr_db)]
        return {"snr_db": f"{sum(finite) / len(finite):.1f}"} if finite else None

    grid = method.options.grid or (plan.quantizer.options.grid if plan.quantizer is not None else None)
    desc = method.name if method.quantizes else f"{method.name} {target.pattern}"
    _layer_pass(model, batches, config, visit, desc if grid is None else f"{desc} {grid.label}")
    result.seconds = time.perf_counter() - started
    return result


def _record(
    result: EngineResult,
    index: int,
    prefix: str,
    layer_stats: dict[str, _Applied],
) -> None:
    for name, applied in layer_stats.items():
        mask = applied.mask
        result.masks[f"{prefix}.{name}"] = mask
        if applied.quant is not None:
            result.quant[f"{prefix}.{name}"] = applied.quant
        shape = (mask.shape[0], mask.shape[1])
        sparsity = mask.float().mean().item()
        stats = LinearStats(index, name, applied.error, applied.signal, sparsity, applied.stored, shape)
        result.stats.append(stats)


@dataclass(frozen=True)
class _LayerStep:
    """What pruning one layer applies: the method at the layer's target, then the refinement,
    then the quantizer."""

    method: PruningMethod
    target: SparsityTarget
    refinement: MaskRefinement | None = None
    sample: TokenSample | None = None
    quantizer: PruningMethod | None = None
    held: dict[str, torch.Tensor] | None = None  # a pruned run's masks in this layer (a quantizer holds them)

    @property
    def needs_gram(self) -> bool:
        return needs_gram(self.method, self.quantizer)


def needs_gram(method: PruningMethod, quantizer: PruningMethod | None = None) -> bool:
    """Whether a layer's statistics are the full X^T X (what its method or quantizer reads)."""
    return method.needs_gram or (quantizer is not None and quantizer.needs_gram)


def _prune_layer(
    layer: nn.Module,
    forward: Callable[[torch.Tensor], torch.Tensor],
    hidden: Any,
    step: _LayerStep,
    config: EngineConfig,
    layouts: dict[tuple[str, ...], list[list[str]]],
) -> dict[str, _Applied]:
    """Statistics, masks and the pruned pass for one layer over `hidden` (its inputs per batch,
    replaced by its pruned outputs). Layers of one structure share their input-group layout,
    found on the first of them."""
    structure = tuple(_linears(layer))
    moments = step.refinement is not None and step.refinement.needs_moments
    # a method that reads column squares gets them summed as always, even where a quantizer after
    # it has X^T X summed too (its masks then equal its unquantized twin's)
    hooks = _StatsHooks(layer, layouts.get(structure), not step.method.needs_gram, step.sample, moments)
    results: dict[str, tuple[torch.Tensor, float, float, float]] = {}
    try:
        # The first pass also finds the groups: it accumulates all of them, or only the first
        # when later groups must see the earlier ones pruned (true-sequential).
        hooks.active = {0} if config.true_sequential else set(range(len(hooks.linears)))
        hooks.run(forward, hidden)
        layouts[structure] = hooks.layout
        indices = list(range(len(hooks.groups)))
        schedule = [[i] for i in indices] if config.true_sequential else [indices]
        for position, group_indices in enumerate(schedule):
            if position > 0:
                hooks.active = set(group_indices)
                hooks.run(forward, hidden)
            for group_index in group_indices:
                group = hooks.groups[group_index]
                results.update(_prune_group(group, layer, step))
    finally:
        hooks.remove()
    return_freed_memory()  # the statistics' and the dense pass's blocks, before the pruned pass
    for position, batch in enumerate(hidden):  # pruned pass: next layer's inputs, in place
        hidden[position] = forward(batch).to(batch.device)
    return results


# ---------------------------------------------------------------------------------------------
# Dense passes: OWL's outlier ratios, layer removal's Block Influence


@dataclass(frozen=True)
class OwlAllocation:
    """OWL's settings: outliers are Wanda scores above `m` times their layer's mean; layer
    sparsities spread over a range 2 * lam wide whose mean is the target S."""

    m: float = 5.0
    lam: float = 0.08


@dataclass(frozen=True)
class PrunePlan:
    """What runs around the method: OWL's layer-wise allocation (else every layer at the target)
    and a mask refinement."""

    allocation: OwlAllocation | None = None
    refinement: MaskRefinement | None = None
    quantizer: PruningMethod | None = None  # a quantization method after a pruning method (--bits)
    held: Mapping[str, torch.Tensor] | None = None  # a pruned run's masks (full names): quantized around


def _layer_pass(
    model: nn.Module,
    batches: list[torch.Tensor],
    config: EngineConfig,
    visit: Callable[[int, nn.Module, Callable, Any], dict[str, str] | None],
    desc: str,
) -> None:
    """The sequential loop every pass over the decoder layers shares (pruning, OWL's and layer
    removal's dense passes): each layer's calls captured from the model's own forward, each layer
    where it computes (`_on_device`) while `visit(index, layer, forward, hidden)` runs it over
    `hidden` (its inputs, per batch) and leaves its outputs there, the next layer's inputs; what
    `visit` returns goes on the progress bar."""
    device = torch.device(config.device)
    with torch.inference_mode():
        calls = capture_layer_calls(model, batches, device, config.offload_activations)
        try:
            progress = tqdm(list(enumerate(decoder_layers(model))), desc=desc, unit="layer")
            for index, layer in progress:
                with _on_device(layer, model, device):
                    postfix = visit(index, layer, _layer_forward(layer, index, calls, device), calls.hidden)
                if postfix:
                    progress.set_postfix(postfix)
        finally:
            calls.hidden.close()


def _passing_hooks(layer: nn.Module, **kwargs: Any) -> _StatsHooks:
    """Hooks on every input group for a pass whose outputs go on to the next layer."""
    hooks = _StatsHooks(layer, **kwargs)
    hooks.stop_early = False
    hooks.active = set(range(len(hooks.linears)))
    return hooks


def outlier_ratios(model: nn.Module, input_ids: torch.Tensor, config: EngineConfig, m: float) -> list[float]:
    """OWL's D_l per decoder layer, in percent (as both reference implementations keep it), from
    the dense model's activations (one dense pass before any pruning): the share of the Wanda
    scores |W_ij| * ||X_j||_2 of all the layer's linears together above `m` times their mean."""
    ratios: list[float] = []
    last = len(decoder_layers(model)) - 1

    def visit(index: int, layer: nn.Module, forward: Callable, hidden: Any) -> None:
        hooks = _passing_hooks(layer, squares=True, gram=False)
        hooks.stop_early = index == last  # no layer reads the last one's outputs
        try:
            hooks.run(forward, hidden)
        finally:
            hooks.remove()
        linears = _linears(layer)
        scores = [
            wanda_scores(linears[name].weight.float(), group.squares.clamp_min(0).sqrt())
            for group in hooks.groups
            for name in group.names
        ]
        ratios.append(outlier_ratio(scores, m))

    _layer_pass(
        model, calibration_batches(input_ids, config.batch_tokens), config, visit, "OWL outlier ratios"
    )
    return ratios


def remove_layers(
    model: nn.Module,
    input_ids: torch.Tensor,
    method: PruningMethod,
    target: SparsityTarget,
    config: EngineConfig,
    on_layer: Callable[[int, nn.Module], None] | None = None,
) -> EngineResult:
    """Structured pruning of whole decoder layers: one dense pass measures each layer's Block
    Influence, 1 - the mean cosine of its input and output hidden states over the calibration
    tokens (every position), and the sampled inputs of its linears; the method chooses the
    layers; their linears are zeroed (masks all True: the layer is then the identity on the
    residual stream, so dense x masks rebuilds the same model) and written through `on_layer`.
    Error and signal of a removed linear are its whole output energy (SNR 0 dB), estimated from
    the engine's token sample; a kept linear has no error."""
    started = time.perf_counter()
    result = EngineResult(masks=PackedMasks())
    batches = calibration_batches(input_ids, config.batch_tokens)
    sample = TokenSample.draw(batches, config.error_sample or sum(batch.numel() for batch in batches))
    result.error_estimate = sample.label
    influence: list[float] = []
    energy: dict[tuple[int, str], float] = {}

    def visit(index: int, layer: nn.Module, forward: Callable, hidden: Any) -> None:
        totals = torch.zeros(2, dtype=torch.float64)  # sum of cosines, tokens

        def measured(batch: torch.Tensor) -> torch.Tensor:
            output = forward(batch)
            cosine = torch.nn.functional.cosine_similarity(batch.float(), output.float(), dim=-1)
            totals.add_(torch.tensor([cosine.double().sum().item(), cosine.numel()], dtype=torch.float64))
            return output

        hooks = _passing_hooks(layer, sample=sample)
        try:
            hooks.run(measured, hidden)
        finally:
            hooks.remove()
        influence.append(1.0 - float(totals[0] / totals[1]))
        linears = _linears(layer)
        for group in hooks.groups:
            rows = torch.cat(group.sample)
            for name in group.names:
                energy[index, name] = torch.sum((rows @ linears[name].weight.float().T) ** 2).item()

    _layer_pass(model, batches, config, visit, f"{method.name} block influence")
    removed = sorted(method.choose_layers(influence, target))
    prefix = {id(layer): name for name, layer in model.named_modules()}
    with torch.inference_mode():
        for index, layer in enumerate(decoder_layers(model)):
            with _on_device(layer, model, torch.device(config.device)):
                layer_stats = {}
                for name, linear in _linears(layer).items():
                    mask = torch.full(tuple(linear.weight.shape), index in removed, dtype=torch.bool)
                    if index in removed:
                        linear.weight.data.zero_()
                    error = energy[index, name] if index in removed else 0.0
                    layer_stats[name] = _Applied(mask, error, energy[index, name], float(index in removed))
                if on_layer is not None:
                    on_layer(index, layer)
            _record(result, index, prefix[id(layer)], layer_stats)
    result.block_influence, result.removed_layers = influence, removed
    result.seconds = time.perf_counter() - started
    return result
