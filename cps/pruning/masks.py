"""Sparsity targets and mask selection: per-row and per-matrix top-k, N:M groups, bit-packing.

A mask is a bool tensor shaped like the weight, True where the weight is pruned (set to zero).
Selection is exact (a fixed count, ties broken by position with a stable sort) and deterministic.
N:M follows the usual convention (NVIDIA, SparseGPT): at most N non-zeros in every M consecutive
input columns, so 2:4 and 4:8 are 50% sparse.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cps.errors import CpsError

_NM = re.compile(r"^(\d+):(\d+)$")


@dataclass(frozen=True)
class SparsityTarget:
    """Unstructured `sparsity` in [0, 1), or an N:M pattern (`keep` of every `group`)."""

    sparsity: float
    keep: int | None = None  # N
    group: int | None = None  # M

    def __post_init__(self) -> None:
        if not 0 <= self.sparsity < 1:
            raise CpsError(f"sparsity must be in [0, 1) (got {self.sparsity:g})")

    @classmethod
    def parse(cls, pattern: str, sparsity: float | None) -> SparsityTarget:
        """`unstructured` with --sparsity, or `N:M` (whose sparsity is 1 - N/M)."""
        if pattern == "unstructured":
            if sparsity is None:
                raise CpsError("unstructured pruning needs --sparsity (e.g. 0.5)")
            return cls(sparsity)
        match = _NM.match(pattern.strip())
        if not match:
            raise CpsError(f"bad pattern {pattern!r}; use unstructured or N:M such as 2:4")
        keep, group = int(match[1]), int(match[2])
        if not 0 < keep < group:
            raise CpsError(f"N:M needs 0 < N < M (got {pattern}): N weights kept in every M")
        implied = 1 - keep / group
        if sparsity is not None and abs(sparsity - implied) > 1e-9:
            raise CpsError(f"--sparsity {sparsity:g} contradicts --pattern {pattern} ({implied:g})")
        return cls(implied, keep, group)

    @property
    def is_nm(self) -> bool:
        return self.group is not None

    @property
    def pattern(self) -> str:
        return f"{self.keep}:{self.group}" if self.is_nm else "unstructured"

    @property
    def pruned_per_group(self) -> int:
        return int(self.group or 0) - int(self.keep or 0)


def _prune_smallest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Mask of the `count` smallest entries along the last dim; ties go to the lower index.

    Equal to a stable sort's first `count` (the reference implementations' choice), computed with
    a selection (kthvalue, linear time) unless ties straddle the threshold, then with the sort.
    """
    if count <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    kth = torch.kthvalue(scores, count, dim=-1, keepdim=True).values
    mask = scores <= kth
    if bool((mask.sum(-1) == count).all()):
        return mask
    order = torch.sort(scores, dim=-1, stable=True).indices[..., :count]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, order, True)


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune int(in * sparsity) lowest scores in every output row (Wanda's comparison group)."""
    return _prune_smallest(scores, int(scores.shape[1] * sparsity))


def matrix_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune int(numel * sparsity) lowest scores over the whole matrix (magnitude pruning)."""
    flat = _prune_smallest(scores.reshape(1, -1), int(scores.numel() * sparsity))
    return flat.reshape(scores.shape)


def nm_mask(scores: torch.Tensor, keep: int, group: int) -> torch.Tensor:
    """Keep the `keep` highest scores in every `group` consecutive columns of each row."""
    rows, columns = scores.shape
    if columns % group:
        raise CpsError(f"N:M with M={group} needs input width divisible by {group} (got {columns})")
    grouped = scores.reshape(rows, columns // group, group)
    return _prune_smallest(grouped, group - keep).reshape(rows, columns)


def target_mask(scores: torch.Tensor, target: SparsityTarget, per_row: bool) -> torch.Tensor:
    """The mask of `target` from importance scores: N:M groups, else per row or per matrix."""
    if target.is_nm:
        return nm_mask(scores, int(target.keep), int(target.group))
    return row_mask(scores, target.sparsity) if per_row else matrix_mask(scores, target.sparsity)


# ---------------------------------------------------------------------------------------------
# Bit-packing (8 mask entries per byte) for the `masks.safetensors` artifact


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Flattened bool mask -> uint8, 8 entries per byte, most significant bit first."""
    bits = mask.reshape(-1).to(torch.uint8)
    padded = torch.nn.functional.pad(bits, (0, (-bits.numel()) % 8))
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
    return (padded.reshape(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    count = 1
    for size in shape:
        count *= size
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8)
    bits = (packed.reshape(-1, 1) >> shifts) & 1
    return bits.reshape(-1)[:count].bool().reshape(shape)


class PackedMasks(MutableMapping[str, torch.Tensor]):
    """Masks kept bit-packed (1 bit a weight, not a bool's byte: Llama-3-70B's would take 69 GB as
    bools, 8.6 GB packed); reading one unpacks it."""

    def __init__(self) -> None:
        self.packed: dict[str, torch.Tensor] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}

    def __setitem__(self, name: str, mask: torch.Tensor) -> None:
        self.packed[name] = pack_mask(mask.cpu())
        self.shapes[name] = tuple(mask.shape)

    def __getitem__(self, name: str) -> torch.Tensor:
        return unpack_mask(self.packed[name], self.shapes[name])

    def __delitem__(self, name: str) -> None:
        del self.packed[name], self.shapes[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.packed)

    def __len__(self) -> int:
        return len(self.packed)


def save_masks(masks: Mapping[str, torch.Tensor], path: str) -> None:

    if isinstance(masks, PackedMasks):
        shapes = {name: list(shape) for name, shape in masks.shapes.items()}
        packed = dict(masks.packed)
    else:
        shapes = {name: list(mask.shape) for name, mask in masks.items()}
        packed = {name: pack_mask(mask.cpu()) for name, mask in masks.items()}
    save_file(packed, path, metadata={"format": "cps-bitpacked-v1", "shapes": json.dumps(shapes)})


def load_masks(path: str) -> dict[str, torch.Tensor]:

    with safe_open(path, framework="pt") as handle:
        shapes = json.loads(handle.metadata()["shapes"])
        return {name: unpack_mask(handle.get_tensor(name), tuple(shapes[name])) for name in shapes}
