"""Quantized checkpoints in compressed-tensors' `pack-quantized` format: the folder llm-compressor
writes for a weight-only (W{b}A16) model, which transformers (compressed-tensors installed) and
vLLM load. Each linear keeps the grid of `cps.pruning.quant`, so the codes are what it stores.

A `save_pretrained` folder whose quantized linears hold weights on their grid is turned in place:
1. every safetensors file's new header is planned from the old one: each quantized linear's
   `<name>.weight` (out, in) gives way to `weight_packed` (out, ceil(in x bits / 32)) int32, its
   codes packed densely along the row (`pack_to_int32`), `weight_scale` (out, groups) in the
   weight's dtype, `weight_zero_point` for an asymmetric grid, packed the same way but along the
   output dimension ((ceil(out x bits / 32), groups) int32: compressed-tensors' layout), and
   `weight_shape` [out, in] int64; tensors are ordered by element size so each stays aligned;
2. each file is written to a temporary file one tensor at a time: the codes come from the saved
   weight and must dequantize back to it exactly (else the grid is not the one the weight lies on,
   e.g. scales not fitted in the checkpoint's dtype), every other tensor is copied byte for byte;
   only once every file is written do they replace the originals;
3. the index (a sharded folder) and config.json's `quantization_config` follow: one config group
   per distinct grid, `targets` the exact module names (compressed-tensors and vLLM match a target
   without `re:` by equality), `ignore` every other matrix of the checkpoint, so that a loader that
   matches by class (vLLM raises on an unmatched Linear) leaves the embedding and LM head dense.

Loading (transformers 5.25, compressed-tensors 0.20), always as `from_pretrained(folder,
**load_kwargs(folder))`:
- symmetric grids, any number of them: nothing extra. transformers builds the quantized linears in
  their compressed layout (plain `nn.Linear` modules holding `weight_packed`, `weight_scale`,
  `weight_shape` and no `weight`; no `CompressedLinear`), loads the tensors as stored, and a
  forward pre-hook decompresses the whole model on its first forward, on CPU too: from then on each
  linear holds the dense weight (code - zero) x scale, computed in the scale's dtype, the in-memory
  quantized model's weight exactly;
- one asymmetric grid: `CompressedTensorsConfig(dequantize=True)`, which decompresses each linear
  while loading (a dense model from the start; transformers warns that the folder's config is used
  with this loading attribute). The default path fails there: it sizes `weight_zero_point`
  unpacked, (out, groups) int8, and refuses the packed tensor every writer stores (and vLLM reads);
- asymmetric grids among several: no path (`load_kwargs` refuses), as decompressing while loading
  takes the first config group's scheme for every linear.
No kernel runs on the packed codes in transformers; vLLM runs them (its W{b}A16 Marlin kernels).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from cps.errors import CpsError
from cps.pruning.quant import QuantGrid, QuantParams
from cps.streaming import WeightReader, _header

# compressed_tensors (and transformers, which it imports: seconds) is imported inside the
# functions that write, read or load a folder, so that importing the pruning package stays light.

FORMAT = "pack-quantized"
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
INDEX_BYTES = {"I32": 4, "I64": 8}  # the integer tensors a compressed linear adds


# ---------------------------------------------------------------------------------------------
# Reading the folder


def quantized_config(folder: Path) -> dict | None:
    """The folder's quantization_config (None for an unquantized checkpoint)."""
    return json.loads((Path(folder) / "config.json").read_text(encoding="utf-8")).get("quantization_config")


def load_kwargs(folder: Path) -> dict:
    """What `from_pretrained(folder, ...)` needs besides the folder for the weights to be the
    in-memory model's (transformers 5.25, compressed-tensors 0.20; see the module docstring):
    nothing for symmetric grids; decompression while loading for one asymmetric grid (the default
    path sizes `weight_zero_point` unpacked and refuses the packed one). Asymmetric grids among
    several have no transformers path: its decompression while loading takes the first config
    group's scheme for every linear (wrong logits, no error), so this refuses them."""
    config = quantized_config(folder)
    if config is None:
        return {}
    schemes = config["config_groups"].values()
    if all(scheme["weights"]["symmetric"] for scheme in schemes):
        return {}
    if len(schemes) > 1:
        raise CpsError(
            f"transformers cannot load {folder}: asymmetric grids among {len(schemes)} different ones "
            "(vLLM can); write one grid, or symmetric ones"
        )
    from transformers import CompressedTensorsConfig

    return {"quantization_config": CompressedTensorsConfig(dequantize=True)}


def _files(folder: Path) -> list[Path]:
    """The folder's safetensors files, as its index (or their single file) names them."""
    if (folder / INDEX).exists():
        index = json.loads((folder / INDEX).read_text(encoding="utf-8"))
        return [folder / name for name in dict.fromkeys(index["weight_map"].values())]
    if (folder / SINGLE).exists():
        return [folder / SINGLE]
    raise CpsError(f"{folder} holds no {SINGLE} nor {INDEX}: not a save_pretrained folder")


# ---------------------------------------------------------------------------------------------
# Writing


@dataclass(frozen=True)
class _Entry:
    """One tensor of a planned file: copied from `source` (name in the old file) or `made` by
    `_make` for the linear `module`."""

    name: str
    dtype: str  # safetensors' name: F32, BF16, I32, ...
    shape: tuple[int, ...]
    nbytes: int
    source: str | None = None
    module: str | None = None

    @property
    def item_size(self) -> int:
        return self.nbytes // max(math.prod(self.shape), 1) or 1


def _plan(header: dict[str, Any], quant: Mapping[str, QuantParams]) -> list[_Entry]:
    """The tensors of a file once its quantized linears are compressed, largest elements first."""
    entries = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        module = key.removesuffix(".weight")
        if not key.endswith(".weight") or module not in quant:
            entries.append(_Entry(key, info["dtype"], tuple(info["shape"]), end - begin, source=key))
            continue
        params, shape = quant[module], info["shape"]
        if len(shape) != 2 or tuple(params.scale.shape) != (shape[0], shape[1] // params.width):
            raise CpsError(
                f"{key} has shape {shape} but its grid has scales {tuple(params.scale.shape)} "
                f"for groups of {params.width}: they belong to different weights"
            )
        rows, columns, bits = shape[0], shape[1], params.grid.bits
        groups = params.scale.shape[1]
        scale_bytes = (end - begin) // (rows * columns) * rows * groups
        made = [
            ("weight_packed", "I32", (rows, math.ceil(columns * bits / 32))),
            ("weight_scale", info["dtype"], (rows, groups)),
            ("weight_shape", "I64", (2,)),
        ]
        if not params.grid.sym:
            made.append(("weight_zero_point", "I32", (math.ceil(rows * bits / 32), groups)))
        for suffix, dtype, made_shape in made:
            nbytes = scale_bytes if suffix == "weight_scale" else math.prod(made_shape) * INDEX_BYTES[dtype]
            entries.append(_Entry(f"{module}.{suffix}", dtype, made_shape, nbytes, module=module))
    return sorted(entries, key=lambda entry: -entry.item_size)  # stable: file order within a size


def _make(entry: _Entry, weight: torch.Tensor, params: QuantParams) -> torch.Tensor:
    """One compressed tensor of a linear from its saved weight W (out, in) and grid."""
    from compressed_tensors.compressors.pack_quantized import pack_to_int32

    suffix, bits = entry.name.rsplit(".", 1)[1], params.grid.bits
    if suffix == "weight_shape":
        return torch.tensor(weight.shape, dtype=torch.int64)
    if suffix == "weight_scale":
        scale = params.scale.to(weight.dtype)
        if not torch.equal(scale.float(), params.scale):
            raise CpsError(
                f"{entry.module}'s scales do not fit {weight.dtype}, the checkpoint's dtype: "
                "fit the grid with that dtype (`QuantGrid.fit(W, dtype)`)"
            )
        return scale
    if suffix == "weight_zero_point":
        return pack_to_int32(params.zero.to(torch.int8), bits, packed_dim=0)
    codes = params.codes(weight)  # (out, in) int8, as stored in the weight's dtype
    if not torch.equal(params.dequantize(codes).to(weight.dtype), weight):
        raise CpsError(
            f"{entry.module}.weight is not on its {params.grid.label} grid in {weight.dtype}: "
            "round it with these scales (fitted in the checkpoint's dtype) before writing"
        )
    return pack_to_int32(codes, bits)


def _write_file(source: Path, target: Path, quant: Mapping[str, QuantParams]) -> dict[str, int]:
    """`source` rewritten to `target` with its quantized linears compressed, one tensor held at a
    time; returns each tensor's size in bytes."""
    header, _ = _header(source)
    reader = WeightReader(source)
    entries = _plan(header, quant)
    new_header: dict[str, Any] = {"__metadata__": header["__metadata__"]} if "__metadata__" in header else {}
    offset = 0
    for entry in entries:
        new_header[entry.name] = {
            "dtype": entry.dtype,
            "shape": list(entry.shape),
            "data_offsets": [offset, offset + entry.nbytes],
        }
        offset += entry.nbytes
    encoded = json.dumps(new_header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # tensors start 8-byte aligned
    with target.open("wb") as out:
        out.write(len(encoded).to_bytes(8, "little"))
        out.write(encoded)
        for entry in entries:
            if entry.source is not None:  # byte for byte
                reader.copy_raw(entry.source, out)
                continue
            params = quant[entry.module]
            made = _make(entry, reader.read(f"{entry.module}.weight"), params).contiguous()
            assert tuple(made.shape) == entry.shape and made.nbytes == entry.nbytes, entry
            out.write(made.reshape(-1).view(torch.uint8).numpy().tobytes())
    return {entry.name: entry.nbytes for entry in entries}


def _config(quant: Mapping[str, QuantParams], ignore: list[str]) -> dict[str, Any]:
    """config.json's `quantization_config`: one group per distinct grid, as llm-compressor writes
    it (compressed-tensors' models dumped as `ModelCompressor.update_config` does)."""
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    by_grid: dict[QuantGrid, list[str]] = {}
    for name, params in quant.items():
        by_grid.setdefault(params.grid, []).append(name)
    groups = {}
    for index, (grid, names) in enumerate(by_grid.items()):
        channel = grid.group_size == -1
        weights = QuantizationArgs(
            num_bits=grid.bits,
            type="int",
            symmetric=grid.sym,
            strategy="channel" if channel else "group",
            group_size=None if channel else grid.group_size,
            dynamic=False,
        )
        groups[f"group_{index}"] = QuantizationScheme(targets=names, weights=weights, format=FORMAT)
    config = QuantizationConfig(
        config_groups=groups, format=FORMAT, quantization_status="compressed", ignore=ignore
    )
    return {
        "version": compressed_tensors.__version__,
        "quant_method": "compressed-tensors",
        "sparsity_config": {},
        "transform_config": {},
        **config.model_dump(exclude={"quant_method"}),
    }


def write_compressed(folder: Path, quant: Mapping[str, QuantParams]) -> None:
    """Turn a `save_pretrained` folder (safetensors: model.safetensors or shards with
    model.safetensors.index.json) in place into a compressed-tensors checkpoint: each named
    linear's `<name>.weight` (values on its grid, in the checkpoint's dtype) replaced by
    `weight_packed`, `weight_scale`, `weight_zero_point` (asymmetric) and `weight_shape`;
    config.json gets `quantization_config`, the index its new keys. One tensor in memory at a time."""
    folder = Path(folder)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if "quantization_config" in config:
        raise CpsError(f"{folder} is already a quantized checkpoint: write_compressed takes a dense one")
    if not quant:
        raise CpsError(f"no quantized linear to write into {folder}")
    files = _files(folder)
    headers = {path: _header(path)[0] for path in files}
    saved = {
        key: info for header in headers.values() for key, info in header.items() if key != "__metadata__"
    }
    missing = sorted(name for name in quant if f"{name}.weight" not in saved)
    if missing:
        raise CpsError(f"{folder} has no weight for {len(missing)} quantized linears, e.g. {missing[0]}")
    ignore = [
        key.removesuffix(".weight")
        for key, info in saved.items()
        if key.endswith(".weight") and len(info["shape"]) == 2 and key.removesuffix(".weight") not in quant
    ]

    written: dict[Path, dict[str, int]] = {}
    try:
        for path in files:
            written[path] = _write_file(path, path.with_name(f".{path.name}.compressed"), quant)
    except BaseException:
        for path in files:
            path.with_name(f".{path.name}.compressed").unlink(missing_ok=True)
        raise
    for path in files:
        path.with_name(f".{path.name}.compressed").replace(path)

    if (folder / INDEX).exists():
        index = json.loads((folder / INDEX).read_text(encoding="utf-8"))
        index["weight_map"] = {key: path.name for path, sizes in written.items() for key in sizes}
        index.setdefault("metadata", {})["total_size"] = sum(
            sum(sizes.values()) for sizes in written.values()
        )
        (folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    config["quantization_config"] = _config(quant, ignore)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Reading codes back


def _bits_by_module(config: dict, modules: list[str]) -> dict[str, int]:
    """The bit width of each packed module, from the config group whose targets name it (exactly
    or by `re:` pattern, as compressed-tensors matches); a module matched by no name takes the one
    group that targets a class (llm-compressor's `targets: ["Linear"]`)."""
    from compressed_tensors.utils.match import match_name

    groups = [
        (scheme["targets"], scheme["weights"]["num_bits"]) for scheme in config["config_groups"].values()
    ]
    by_class = [
        bits for targets, bits in groups if any(not t.startswith("re:") and "." not in t for t in targets)
    ]
    bits = {}
    for module in modules:
        named = [group_bits for targets, group_bits in groups if any(match_name(module, t) for t in targets)]
        if not named and len(by_class) != 1:
            raise CpsError(f"no config group of the quantization_config targets {module}")
        bits[module] = (named or by_class)[0]
    return bits


def read_codes(folder: Path, names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """The integer codes (int8, (out, in)) of each quantized linear in a compressed-tensors folder
    (written by `write_compressed` or llm-compressor), all of them in the files' order, or `names`
    in theirs: for the analyses that compare runs' codes."""
    from compressed_tensors.compressors.pack_quantized import unpack_from_int32

    folder = Path(folder)
    config = quantized_config(folder)
    if config is None or config.get("format") != FORMAT:
        raise CpsError(f"{folder} is not a {FORMAT} compressed-tensors checkpoint")
    located = {key: path for path in _files(folder) for key in _header(path)[0] if key != "__metadata__"}
    packed = [key.removesuffix(".weight_packed") for key in located if key.endswith(".weight_packed")]
    wanted = packed if names is None else list(names)
    unknown = sorted(set(wanted) - set(packed))
    if unknown:
        raise CpsError(f"{folder} holds no quantized linear {unknown[0]} ({len(unknown)} unknown)")
    bits = _bits_by_module(config, wanted)
    with ExitStack() as stack:
        handles = {path: stack.enter_context(safe_open(str(path), "pt")) for path in set(located.values())}

        def tensor(key: str) -> torch.Tensor:
            return handles[located[key]].get_tensor(key)

        for module in wanted:
            shape = torch.Size(tensor(f"{module}.weight_shape").tolist())
            yield module, unpack_from_int32(tensor(f"{module}.weight_packed"), bits[module], shape)


def dequantize_now(model: torch.nn.Module) -> None:
    """A model loaded from a compressed folder with dense linears from now on: transformers
    decompresses them on the first forward (a pre-hook), so one forward of one token on the CPU
    (where `from_pretrained` leaves it) does it before anything reads a linear's weight."""
    with torch.no_grad():
        model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=next(model.parameters()).device))
