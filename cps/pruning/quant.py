"""The integer grid every weight quantizer rounds to (GPTQ, RTN, SparseGPT's joint mode), as the
compressed-tensors format stores it: per output row and group of `group_size` input columns (the
whole row with `group_size = -1`, per channel), a scale and a zero point, signed codes in
[-2^(b-1), 2^(b-1) - 1] and the weight (code - zero) x scale.

Min-max, as compressed-tensors' `calculate_qparams` (llm-compressor's default observer): the range
of each group is widened to hold 0; symmetric, scale = max|w| / ((2^b - 1) / 2) and zero 0;
asymmetric, scale = (max - min) / (2^b - 1) and zero = round(-2^(b-1) - min / scale), clamped to
the codes. Either way 0 is a code, so a pruned weight stays exactly 0 once quantized. Scales are
fitted once, on the weights as they come in (before GPTQ moves them: llm-compressor's order; the
GPTQ reference's `static_groups`), so act-order needs no group index in the saved model.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import torch

from cps.errors import CpsError

BITS = range(2, 9)


@dataclass(frozen=True)
class QuantGrid:
    bits: int = 4
    group_size: int = 128  # input columns per scale; -1: one per output row (per channel)
    sym: bool = True

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise CpsError(f"--bits must be between 2 and 8 (got {self.bits})")
        if self.group_size != -1 and self.group_size < 1:
            raise CpsError(
                f"--group-size must be positive, or -1 for one scale per row (got {self.group_size})"
            )

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def label(self) -> str:
        """As tables name it: w4g128, w3 (per channel), w4g128a (asymmetric)."""
        group = "" if self.group_size == -1 else f"g{self.group_size}"
        return f"w{self.bits}{group}{'' if self.sym else 'a'}"

    def width(self, columns: int) -> int:
        """Columns per group for a weight with `columns` inputs (they must divide evenly)."""
        if self.group_size == -1:
            return columns
        if columns % self.group_size:
            raise CpsError(
                f"--group-size {self.group_size} must divide every linear's input width (got {columns}); "
                "use a divisor or -1 (per channel)"
            )
        return self.group_size

    def fit(self, weight: torch.Tensor, dtype: torch.dtype | None = None) -> QuantParams:
        """Scales and zero points of W (out, in), min-max per row and group; scales rounded to
        `dtype` (the dtype the model stores them in) so the grid is the one a checkpoint holds."""
        rows, columns = weight.shape
        width = self.width(columns)
        groups = weight.float().reshape(rows, columns // width, width)
        low = groups.amin(dim=2).clamp_max(0)
        high = groups.amax(dim=2).clamp_min(0)
        if self.sym:
            scale = torch.maximum(low.abs(), high) / ((self.qmax - self.qmin) / 2)
        else:
            scale = (high - low) / (self.qmax - self.qmin)
        if dtype is not None:
            scale = scale.to(dtype).float()
        tiny = torch.finfo(dtype or torch.float32).eps
        scale = torch.where(scale == 0, torch.full_like(scale, tiny), scale)
        if self.sym:
            zero = torch.zeros_like(scale)
        else:
            zero = torch.round(torch.clamp(self.qmin - low / scale, self.qmin, self.qmax))
        return QuantParams(self, scale, zero, width)


@dataclass
class QuantParams:
    """One linear's grid: scale and zero (out, groups) fp32 (zero holds integers), `width`
    input columns per group."""

    grid: QuantGrid
    scale: torch.Tensor
    zero: torch.Tensor
    width: int

    def expanded(self, columns: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero per weight (out, in)."""
        return (
            self.scale.repeat_interleave(self.width, dim=1)[:, :columns],
            self.zero.repeat_interleave(self.width, dim=1)[:, :columns],
        )

    def codes(self, weight: torch.Tensor) -> torch.Tensor:
        """The integer codes of W (out, in) on this grid, int8. A weight stored in a narrower
        dtype than fp32 is (code - zero) x scale rounded to it: on a wide grid (8 bits,
        asymmetric, in bfloat16) that rounding can move it past half a step, so where the nearest
        code does not give the stored value back, its neighbour that does is the code."""
        scale, zero = self.expanded(weight.shape[1])
        low, high = self.grid.qmin, self.grid.qmax
        codes = torch.clamp(weight.float() / scale + zero, low, high).round_()
        if weight.dtype != torch.float32:
            for shift in (-1, 1):
                wrong = ((codes - zero) * scale).to(weight.dtype) != weight
                if not wrong.any():
                    break
                neighbour = (codes + shift).clamp_(low, high)
                codes = torch.where(
                    wrong & (((neighbour - zero) * scale).to(weight.dtype) == weight), neighbour, codes
                )
        return codes.to(torch.int8)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        scale, zero = self.expanded(codes.shape[1])
        return (codes.float() - zero) * scale

    def round(self, weight: torch.Tensor) -> torch.Tensor:
        """W rounded to the nearest grid point (fp32): round to nearest, RTN."""
        return self.dequantize(self.codes(weight))

    def to(self, device: torch.device | str) -> QuantParams:
        return QuantParams(self.grid, self.scale.to(device), self.zero.to(device), self.width)

    def split(self, rows: list[int]) -> list[QuantParams]:
        """Per linear, for params fitted on several linears' stacked rows."""
        return [
            QuantParams(self.grid, scale, zero, self.width)
            for scale, zero in zip(self.scale.split(rows), self.zero.split(rows), strict=True)
        ]


class ColumnRounder:
    """Rounds one input column at a time to the grid (the GPTQ loop's inner step), on W^T's rows:
    column j of W (its `out` weights) with the scale and zero of its group."""

    def __init__(self, params: QuantParams, order: torch.Tensor | None = None) -> None:
        columns = params.scale.shape[1] * params.width
        original = order.tolist() if order is not None else range(columns)
        self.group = [j // params.width for j in original]  # position -> its column's group
        self.scale = params.scale.T.contiguous()  # (groups, out)
        self.zero = None if params.grid.sym else params.zero.T.contiguous()
        self.low, self.high = float(params.grid.qmin), float(params.grid.qmax)

    def __call__(self, position: int, column: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """`out` = the column at `position` (in the loop's order) rounded to its grid."""
        group = self.group[position]
        scale = self.scale[group]
        torch.div(column, scale, out=out)
        if self.zero is None:
            return out.clamp_(self.low, self.high).round_().mul_(scale)
        zero = self.zero[group]
        return out.add_(zero).clamp_(self.low, self.high).round_().sub_(zero).mul_(scale)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed codes (int8, (out, in)) as unsigned bytes, two to a byte where they fit in 4 bits
    (an even number of columns): the `quant.safetensors` artifact of a quantized run."""
    unsigned = (codes.to(torch.int16) + 2 ** (bits - 1)).to(torch.uint8)
    if bits > 4 or unsigned.shape[1] % 2:
        return unsigned
    return unsigned[:, 0::2] | (unsigned[:, 1::2] << 4)


def unpack_codes(packed: torch.Tensor, bits: int, columns: int) -> torch.Tensor:
    """`pack_codes` undone: int8 codes (out, columns)."""
    if packed.shape[1] != columns:  # two to a byte
        unsigned = torch.stack([packed & 0x0F, packed >> 4], dim=2).reshape(packed.shape[0], -1)
    else:
        unsigned = packed
    return (unsigned.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)


def save_quant(path: str, quant: dict[str, QuantParams], weight_of: Callable[[str], torch.Tensor]) -> None:
    """A quantized run's grid and integer codes (`quant.safetensors`): per linear `<name>.codes`
    (`pack_codes`), `<name>.scale`, `<name>.zero` (out, groups); metadata bits, group_size, sym
    and each linear's input width. `weight_of(name)` reads the quantized weight (the model in
    memory, or a streamed run's shards), one linear at a time."""
    from safetensors.torch import save_file

    tensors, meta = {}, {}
    for name, params in quant.items():
        codes = params.codes(weight_of(name))
        grid = params.grid
        tensors[f"{name}.codes"] = pack_codes(codes, grid.bits).contiguous()
        tensors[f"{name}.scale"] = params.scale.contiguous()
        tensors[f"{name}.zero"] = params.zero.contiguous()
        meta[name] = [grid.bits, grid.group_size, int(grid.sym), codes.shape[1]]
    save_file(tensors, path, metadata={"cps.quant": json.dumps(meta)})


def load_quant(path: str) -> dict[str, tuple[QuantParams, torch.Tensor]]:
    """`save_quant`'s file: per linear its grid and its int8 codes (out, in)."""
    from safetensors import safe_open

    with safe_open(path, "pt") as stored:
        meta = json.loads((stored.metadata() or {})["cps.quant"])
        loaded = {}
        for name, (bits, group_size, sym, columns) in meta.items():
            grid = QuantGrid(bits, group_size, bool(sym))
            scale, zero = stored.get_tensor(f"{name}.scale"), stored.get_tensor(f"{name}.zero")
            params = QuantParams(grid, scale, zero, columns // scale.shape[1])
            loaded[name] = (params, unpack_codes(stored.get_tensor(f"{name}.codes"), bits, columns))
    return loaded
