"""The interface every pruning method implements, and the method registry.

Lifecycle: the engine gathers `InputStats` for each linear's input over the calibration tokens,
calls `method.prune(W, stats, target)` once per linear, and applies what comes back. Methods never
see layers, hooks or the tracking store.
"""

from __future__ import annotations

import importlib
import pkgutil
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cache
from typing import ClassVar

import torch

import cps.pruning
from cps.errors import CpsError
from cps.pruning.masks import SparsityTarget
from cps.pruning.quant import QuantGrid, QuantParams
from cps.registry import Registry


@dataclass
class InputStats:
    """What the calibration inputs X (tokens, in) of one linear tell the methods: the full X^T X
    for a method that `needs_gram`, else only the squared column norms (what Wanda reads)."""

    gram: torch.Tensor | None  # H = X^T X summed over tokens, fp32 (in, in)
    tokens: int
    squares: torch.Tensor | None = None  # sum over tokens of X_tj^2, fp32 (in,)
    # First moments, gathered only for a refinement that reads them (DSnoT, `needs_moments`):
    sums: torch.Tensor | None = None  # sum over tokens of X_tj, fp32 (in,)
    window_var: torch.Tensor | None = None  # mean over windows of each window's variance of X_j (in,)
    windows: int = 0  # calibration windows (sequences) the tokens came in

    def column_means(self) -> torch.Tensor:
        """E[X_j] over the calibration tokens (in,)."""
        if self.sums is None:
            raise ValueError("this step needs the column sums of X: declare needs_moments = True")
        return self.sums / max(self.tokens, 1)

    def column_norms(self) -> torch.Tensor:
        """||X_j||_2 per input column (in,)."""
        squares = self.squares if self.squares is not None else torch.diagonal(self.require_gram())
        return torch.sqrt(squares.clamp_min(0))

    def require_gram(self) -> torch.Tensor:
        if self.gram is None:
            raise ValueError("this method needs X^T X: declare needs_gram = True")
        return self.gram


@dataclass(frozen=True)
class MethodOptions:
    blocksize: int = 128  # SparseGPT: columns per lazy-update block
    dampening: float = 0.01  # SparseGPT: fraction of mean(diag H) added to the diagonal
    ria_a: float = 0.5  # RIA: exponent of the activation norm ||X_j||^a
    # DSnoT (the reference's defaults: max_cycle_time 50, update_threshold 0.1,
    # pow_of_var_regrowing 1, skip_layer mlp):
    dsnot_cycles: int = 50  # regrow/prune swaps per row at most
    dsnot_threshold: float = 0.1  # a row stops once |its expected reconstruction error| is below
    dsnot_var_power: float = 1.0  # regrowing ranks by W_ij E[X_j] / Var(X_j)^power
    dsnot_skip: str = "mlp"  # sub-block left as the mask method left it: mlp | self_attn | none
    # Quantization (GPTQ, RTN; SparseGPT's joint mode): None leaves the weights unquantized
    bits: int | None = None
    group_size: int = 128  # input columns per scale; -1: per output channel
    sym: bool = True
    act_order: bool = False  # GPTQ: columns in descending order of H's diagonal
    scale_dtype: torch.dtype | None = None  # the dtype the model stores (and scales are kept in)

    @property
    def grid(self) -> QuantGrid | None:
        return None if self.bits is None else QuantGrid(self.bits, self.group_size, self.sym)

    def __post_init__(self) -> None:
        self.grid  # noqa: B018  (validated)
        if self.blocksize < 1:
            raise CpsError(f"--blocksize must be positive (got {self.blocksize})")
        if not 0 < self.dampening < 1e3:
            raise CpsError(f"--dampening must be positive (got {self.dampening:g})")
        if not 0 <= self.ria_a <= 4:
            raise CpsError(f"--ria-a must be in [0, 4] (got {self.ria_a:g})")
        if self.dsnot_cycles < 1:
            raise CpsError(f"--dsnot-cycles must be positive (got {self.dsnot_cycles})")
        if self.dsnot_threshold < 0:
            raise CpsError(f"--dsnot-threshold must be non-negative (got {self.dsnot_threshold:g})")
        if self.dsnot_skip not in ("mlp", "self_attn", "none"):
            raise CpsError(f"--dsnot-skip must be mlp, self_attn or none (got {self.dsnot_skip!r})")


@dataclass
class Pruned:
    mask: torch.Tensor  # bool (out, in), True = pruned
    weight: torch.Tensor | None = None  # reconstructed weights (zero where pruned), if the method updates
    quant: QuantParams | None = None  # the grid `weight` lies on, where quantized


class PruningMethod(ABC):
    """A method, registered under its module's name. Its traits tell the stages what they need to
    know without naming it: whether it changes the kept weights (then its pruned model cannot be
    rebuilt from the dense weights and the masks), whether it reads the full X^T X of its inputs
    (else the engine gathers only their squared column norms), and which `MethodOptions` shape its result (its
    run logs them as params)."""

    name: ClassVar[str]
    updates_weights: ClassVar[bool] = False
    needs_gram: ClassVar[bool] = False  # the full X^T X (else the engine sums only squared columns)
    logged_options: ClassVar[tuple[str, ...]] = ()
    removes_layers: ClassVar[bool] = False  # structured: whole decoder layers go (`choose_layers`)
    supports_nm: ClassVar[bool] = True  # N:M patterns make sense for it
    quantizes: ClassVar[bool] = False  # a quantization method (`quantize_group`): prunes nothing
    joint_quantization: ClassVar[bool] = False  # quantizes in its own loop with `--bits` (SparseGPT)

    def __init__(self, options: MethodOptions | None = None) -> None:
        self.options = options or MethodOptions()

    @abstractmethod
    def prune(self, weight: torch.Tensor, stats: InputStats, target: SparsityTarget) -> Pruned:
        """Masks (and optionally new weights) for one linear. `weight` is fp32 (out, in)."""

    def prune_group(
        self, weights: list[torch.Tensor], stats: InputStats, target: SparsityTarget
    ) -> list[Pruned]:
        """`prune` for each linear of an input group (the linears reading the same inputs, e.g.
        q, k and v); a method may do them together where that saves work, with the same results."""
        return [self.prune(weight, stats, target) for weight in weights]

    def quantize_group(
        self, weights: list[torch.Tensor], stats: InputStats, masks: list[torch.Tensor | None]
    ) -> list[Pruned]:
        """A quantization method: the linears of one input group on `options.grid`, each one's
        `masks` (its zeros after pruning) held at 0; `Pruned.weight` the dequantized weights."""
        raise NotImplementedError(f"{self.name} does not quantize")

    def choose_layers(self, influence: list[float], target: SparsityTarget) -> list[int]:
        """A layer-removing method: the decoder layers to remove, from each layer's Block
        Influence (1 - cosine of its input and output hidden states)."""
        raise NotImplementedError(f"{self.name} prunes within layers")


class QuantizationMethod(PruningMethod):
    """A weight quantizer (GPTQ, RTN), registered and run like a pruning method: at sparsity 0 it
    quantizes the dense weights; after a pruning method (`--bits` on `cps prune`, the engine's
    plan) it quantizes the pruned ones, their zeros held."""

    quantizes = True
    updates_weights = True
    supports_nm = False

    def prune(self, weight: torch.Tensor, stats: InputStats, target: SparsityTarget) -> Pruned:
        return self.prune_group([weight], stats, target)[0]

    def prune_group(
        self, weights: list[torch.Tensor], stats: InputStats, target: SparsityTarget
    ) -> list[Pruned]:
        return self.quantize_group(weights, stats, [None] * len(weights))

    def require_grid(self) -> QuantGrid:
        grid = self.options.grid
        if grid is None:
            raise CpsError(f"{self.name} needs --bits")
        return grid


METHODS: Registry[PruningMethod] = Registry()
register = METHODS.register


class MaskRefinement(ABC):
    """A step after a mask method (`--refine NAME`), registered under its module's name: it takes
    one linear's dense weight and mask and returns a new mask of the same sparsity. It reads the
    inputs' first moments when `needs_moments` (the engine then gathers `sums` and `window_var`)."""

    name: ClassVar[str]
    needs_moments: ClassVar[bool] = True
    logged_options: ClassVar[tuple[str, ...]] = ()  # the `MethodOptions` fields its run logs

    def __init__(self, options: MethodOptions | None = None) -> None:
        self.options = options or MethodOptions()

    @abstractmethod
    def refine(
        self, module: str, weight: torch.Tensor, mask: torch.Tensor, stats: InputStats, target: SparsityTarget
    ) -> torch.Tensor:
        """The refined bool mask (out, in), True = pruned; `module` is the linear's name inside its
        decoder layer (e.g. mlp.down_proj), `weight` its dense fp32 weight (out, in)."""


REFINEMENTS: Registry[MaskRefinement] = Registry()
register_refinement = REFINEMENTS.register


def refinement_class(name: str) -> type[MaskRefinement]:
    _discover_methods()
    if name not in REFINEMENTS:
        raise CpsError(f"unknown refinement {name!r}; use one of {', '.join(sorted(REFINEMENTS))} or none")
    return REFINEMENTS[name]


def method_class(name: str) -> type[PruningMethod]:
    _discover_methods()
    if name not in METHODS:
        raise CpsError(f"unknown method {name!r}; use one of {', '.join(sorted(METHODS))} or dense")
    return METHODS[name]


@cache
def _discover_methods() -> None:
    """Import every module of `cps.pruning` once: each method registers itself (a new method is one
    new file). Not at import time: the method modules import this one."""
    for module in pkgutil.iter_modules(cps.pruning.__path__):
        importlib.import_module(f"cps.pruning.{module.name}")


def get_method(name: str, options: MethodOptions | None = None) -> PruningMethod:
    return method_class(name)(options)
