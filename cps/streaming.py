"""Models larger than memory: weights read from their safetensors shards one module at a time.

A `StreamedModel` is the model's skeleton (parameters on the meta device, buffers real) and a
`WeightReader` over its shards. The pruning engine and the evaluation walk the decoder layers in
order: `materialize(layer)` reads one layer's parameters (in the run's dtype, on its device), the
layer runs over every window, `release(layer)` drops them. The input embedding is never read
whole: only the rows of the tokens at hand (`gather_rows`); the LM head is read in row chunks by
the evaluation. Peak memory is one layer + the activations of every window + the method's
per-layer statistics + the packed masks (the formula: `benchmarks/stream_bench.py`), not the model.

Also here, because both the engine and the evaluation use them: `capture_layer_calls` (each
layer's own call arguments, from the model's own forward) and `ActivationBuffer` (every window's
hidden states between layers, in memory or in files).
"""

from __future__ import annotations

import ctypes
import gc
import json
import logging
import math
import os
import re
import shutil
import struct
import tempfile
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch
from accelerate import init_empty_weights
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from cps.errors import CpsError
from cps.models import (
    LoadedModel,
    LoadOptions,
    check_shapes,
    decoder_layers,
    load_model,
    load_tokenizer,
    placement,
    resolve_model,
    weights_folder,
)

log = logging.getLogger(__name__)

STREAM_SHARE = 0.6  # stream when the weights would take more than this share of free memory
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


# ---------------------------------------------------------------------------------------------
# Reading and writing safetensors without holding a file


@dataclass(frozen=True)
class TensorEntry:
    path: Path
    start: int  # absolute byte offset of the data in the file
    stop: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def row_bytes(self) -> int:
        rows = self.shape[0] if self.shape else 1
        return (self.stop - self.start) // max(rows, 1)


def _header(path: Path) -> tuple[dict[str, Any], int]:
    with open(path, "rb") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(size))
    return header, 8 + size


class WeightReader:
    """Every tensor of a folder's `*.safetensors` files, read on demand with `os.pread`: nothing is
    mapped, so what was read is freed with the tensor."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        files = [self.folder] if self.folder.is_file() else sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise CpsError(f"no safetensors weights in {self.folder}: cannot stream this model")
        self.entries: dict[str, TensorEntry] = {}
        for path in files:
            header, base = _header(path)
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                begin, end = info["data_offsets"]
                dtype = _DTYPES[info["dtype"]]
                self.entries[name] = TensorEntry(path, base + begin, base + end, dtype, tuple(info["shape"]))

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def _read(self, entry: TensorEntry, start: int, stop: int, shape: tuple[int, ...]) -> torch.Tensor:
        buffer = bytearray(stop - start)
        with open(entry.path, "rb", buffering=0) as handle:
            view, done = memoryview(buffer), 0
            while done < len(buffer):
                got = os.preadv(handle.fileno(), [view[done:]], start + done)
                if got <= 0:
                    raise CpsError(f"{entry.path} is truncated: cannot stream it")
                done += got
        if not buffer:
            return torch.empty(shape, dtype=entry.dtype)
        return torch.frombuffer(buffer, dtype=entry.dtype).reshape(shape)

    def entry(self, name: str) -> TensorEntry:
        if name not in self.entries:
            raise CpsError(f"{self.folder} has no tensor {name!r}: cannot stream this model")
        return self.entries[name]

    def read(self, name: str) -> torch.Tensor:
        entry = self.entry(name)
        return self._read(entry, entry.start, entry.stop, entry.shape)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of a 2-D tensor."""
        entry = self.entry(name)
        width = entry.row_bytes
        return self._read(
            entry, entry.start + start * width, entry.start + stop * width, (stop - start, *entry.shape[1:])
        )

    def gather_rows(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        """The rows `ids` (sorted, unique) of a 2-D tensor, reading each run of consecutive ids once."""
        parts, begin = [], 0
        values = ids.tolist()
        for position in range(1, len(values) + 1):
            if position == len(values) or values[position] != values[position - 1] + 1:
                parts.append(self.rows(name, values[begin], values[position - 1] + 1))
                begin = position
        return torch.cat(parts) if parts else torch.empty(0)

    def copy_raw(self, name: str, handle: Any, chunk: int = 64 << 20) -> None:
        """Append the tensor's bytes to an open file, `chunk` bytes at a time."""
        entry = self.entry(name)
        with open(entry.path, "rb", buffering=0) as source:
            position = entry.start
            while position < entry.stop:
                data = os.pread(source.fileno(), min(chunk, entry.stop - position), position)
                handle.write(data)
                position += len(data)


def copy_tensors(reader: WeightReader, names: dict[str, str], path: Path) -> int:
    """One safetensors file of tensors copied byte for byte from `reader` (target name -> source
    name), never held in memory; returns the bytes of tensor data written."""
    header: dict[str, Any] = {}
    offset = 0
    for target, source in names.items():
        entry = reader.entry(source)
        size = entry.stop - entry.start
        header[target] = {
            "dtype": _NAMES[entry.dtype],
            "shape": list(entry.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for source in names.values():
            reader.copy_raw(source, handle)
    return offset


class ShardWriter:
    """Writes a model folder shard by shard as tensors are produced, the way `save_pretrained`
    lays it out (`model-0000k-of-0000n.safetensors` + `model.safetensors.index.json`), so that
    `from_pretrained` loads it."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.shards: list[tuple[Path, list[str]]] = []
        self.total = 0

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        path = self.folder / f".shard-{len(self.shards):05d}.safetensors"
        save_file({name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}, str(path))
        self.shards.append((path, list(tensors)))
        self.total += sum(t.numel() * t.element_size() for t in tensors.values())

    def copy(self, reader: WeightReader, names: dict[str, str]) -> None:
        """Tensors copied byte for byte from `reader` (target name -> source name), never held."""
        path = self.folder / f".shard-{len(self.shards):05d}.safetensors"
        self.total += copy_tensors(reader, names, path)
        self.shards.append((path, list(names)))

    def close(self) -> None:
        count = len(self.shards)
        weight_map = {}
        for index, (path, names) in enumerate(self.shards):
            final = self.folder / f"model-{index + 1:05d}-of-{count:05d}.safetensors"
            path.rename(final)
            weight_map |= {name: final.name for name in names}
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


# ---------------------------------------------------------------------------------------------
# The streamed model


@dataclass
class StreamedModel:
    """A model whose parameters live in `reader` until a module is materialized."""

    model: nn.Module  # the skeleton: parameters on the meta device
    reader: WeightReader
    dtype: torch.dtype
    device: torch.device
    names: dict[int, str] = field(default_factory=dict)  # id(module) -> its name in the model
    offload: bool = False  # activations between layers in files (--offload-activations)
    # Pruned weights over the dense ones: tensors of `overlay` replace the reader's (kept or
    # re-pruned layers), `overrides` transform what is read (dense x mask).
    overlay: WeightReader | None = None
    overrides: dict[str, Callable[[torch.Tensor], torch.Tensor]] = field(default_factory=dict)

    def source_name(self, name: str, reader: WeightReader | None = None) -> str:
        """The checkpoint's name for a parameter: tied embeddings are stored once, under either name
        (`save_pretrained` keeps the input embedding, safetensors' `save_model` the LM head)."""
        reader = reader or self.reader
        if name in reader:
            return name
        if self.tied and name in (self.head_name, self.embed_name):
            other = self.embed_name if name == self.head_name else self.head_name
            if other in reader:
                return other
        raise CpsError(f"{reader.folder} has no tensor {name!r}: cannot stream this model")

    def use_overlay(self, reader: WeightReader) -> None:
        """Read the tensors of `reader` (pruned layers: kept, re-pruned or just written) instead of
        the checkpoint's, once they are checked to be parameters of this model, of its shapes."""
        self.check(reader, whole=False)
        self.overlay = reader

    @property
    def embed_name(self) -> str:
        return f"{self.names[id(self.model.get_input_embeddings())]}.weight"

    @property
    def head_name(self) -> str:
        head = self.model.get_output_embeddings()
        return f"{self.names[id(head)]}.weight" if head is not None else ""

    @property
    def tied(self) -> bool:
        head = self.model.get_output_embeddings()
        if head is None:
            return False
        config = self.model.config
        return head.weight is self.model.get_input_embeddings().weight or bool(
            getattr(config, "tie_word_embeddings", False)
            or getattr(config.get_text_config(), "tie_word_embeddings", False)
        )

    def check(self, reader: WeightReader, whole: bool = True) -> None:
        """The tensors of `reader` fit the skeleton, as `from_pretrained`'s loading info would
        say: every parameter stored (`whole`; an overlay replaces only some), none the model has no
        place for, none of another shape. Anything else is a `CpsError` naming the keys."""
        model = self.model
        missing = []
        if whole:
            for name, _ in model.named_parameters():
                try:
                    self.source_name(name, reader)
                except CpsError:
                    missing.append(name)
        check_shapes(
            str(reader.folder),
            {name: entry.shape for name, entry in reader.entries.items()},
            {name: tensor.shape for name, tensor in model.state_dict(keep_vars=True).items()},
            missing,
            [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()],
        )

    def read(self, name: str) -> torch.Tensor:
        """A parameter as the in-memory model would hold it: in the run's dtype (floating point)."""
        if self.overlay is not None and name in self.overlay:
            tensor = self.overlay.read(name)
        else:
            tensor = self.reader.read(self.source_name(name))
        if tensor.is_floating_point():
            tensor = tensor.to(self.dtype)
        if name in self.overrides:
            tensor = self.overrides[name](tensor)
        return tensor

    def materialize(self, module: nn.Module) -> None:
        prefix = self.names[id(module)]
        for name, _ in list(module.named_parameters()):
            _place(module, name, self.read(f"{prefix}.{name}" if prefix else name).to(self.device))

    def release(self, module: nn.Module) -> None:
        for name, parameter in list(module.named_parameters()):
            _place(module, name, torch.empty(parameter.shape, dtype=parameter.dtype, device="meta"))
        return_freed_memory()

    def layer_state(self, layer: nn.Module) -> dict[str, torch.Tensor]:
        """A materialized layer's parameters under their full names (for the shard writer)."""
        prefix = self.names[id(layer)]
        return {f"{prefix}.{name}": p.detach() for name, p in layer.named_parameters()}

    def outside_layers(self) -> list[str]:
        """Parameter names outside the decoder layers, the input embedding and the LM head: the
        final norm and the like, small enough to stay materialized throughout."""
        layers = decoder_layers(self.model)
        inside = {id(p) for layer in layers for p in layer.parameters()}
        skip = {self.embed_name, self.head_name}
        return [name for name, p in self.model.named_parameters() if id(p) not in inside and name not in skip]

    def materialize_outside(self) -> None:
        for name in self.outside_layers():
            _place(self.model, name, self.read(name).to(self.device))

    @contextmanager
    def embedding_rows(self, input_ids: torch.Tensor) -> Iterator[torch.Tensor]:
        """While inside, the input embedding holds only the rows of `input_ids`' tokens; yields the
        ids renumbered to index them. The model's own embedding code (Gemma's scaling included)
        then computes exactly what the full table would."""
        embedding = self.model.get_input_embeddings()
        vocabulary, local = torch.unique(input_ids, return_inverse=True)
        rows = self.reader.gather_rows(self.source_name(self.embed_name), vocabulary)
        saved = embedding._parameters["weight"]
        embedding._parameters["weight"] = nn.Parameter(
            rows.to(self.dtype).to(self.device), requires_grad=False
        )
        try:
            yield local
        finally:
            embedding._parameters["weight"] = saved


def return_freed_memory(collect: bool = False) -> None:
    """Hand memory freed since the last call back to the system. glibc keeps freed blocks of the
    per-layer work (a layer's weights, the MLP's intermediate activations) in its heap, where
    fragmentation pins them: without this the resident size of a streamed run grows by tens of
    MB with every layer."""
    if collect:  # objects in reference cycles (a tokenizer's) are freed only by the collector;
        gc.collect()  # a full collection takes ~0.4 s with mlflow imported: not once per layer
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


MADV_DONTNEED = 4
MADV_POPULATE_READ = 22


class FilePages:
    """The rows of a CPU tensor that maps a file (a safetensors checkpoint opened in place), whose
    resident pages are handed back once read: dropped from this process's memory and read again
    from the page cache (a minor fault) when touched again, with the file's bytes.

    Dropping a page of a private mapping discards what was written to it since it was mapped, so
    rows are released only when /proc/self/pagemap shows every one of their pages untouched by a
    write: resident as a page of the file (bit 61) or not resident and not swapped (bit 62). A
    tensor that was written to (a pruned head) keeps its pages. `of` returns None for any other
    tensor (anonymous memory, a GPU, no /proc, not glibc)."""

    def __init__(self, address: int, row_bytes: int, rows: int) -> None:
        self.address, self.row_bytes, self.rows = address, row_bytes, rows
        self.page = os.sysconf("SC_PAGE_SIZE")

    @classmethod
    def of(cls, tensor: torch.Tensor) -> FilePages | None:
        if _LIBC is None or tensor.device.type != "cpu" or tensor.dim() != 2 or not tensor.is_contiguous():
            return None
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        try:
            with open("/proc/self/maps") as maps:
                for line in maps:
                    fields = line.split()
                    low, high = (int(bound, 16) for bound in fields[0].split("-"))
                    if low <= start < high:
                        backed = len(fields) >= 6 and fields[4] != "0" and fields[5].startswith("/")
                        pages = cls(start, tensor.shape[1] * tensor.element_size(), tensor.shape[0])
                        return pages if backed and end <= high and pages._flags(0, 1) is not None else None
        except OSError:
            return None
        return None

    def _flags(self, begin: int, end: int) -> torch.Tensor | None:
        """The pagemap entries of the pages in [begin, end) (addresses), None if unreadable."""
        first, count = begin // self.page, max(0, (end - begin) // self.page)
        try:
            with open("/proc/self/pagemap", "rb") as pagemap:
                pagemap.seek(first * 8)
                raw = pagemap.read(count * 8)
        except OSError:
            return None
        if len(raw) != count * 8:
            return None
        if not count:  # (frombuffer refuses an empty buffer)
            return torch.zeros(0, dtype=torch.int64)
        return torch.frombuffer(bytearray(raw), dtype=torch.int64)

    def populate(self, first: int, last: int) -> None:
        """Map rows [first, last) in one call (MADV_POPULATE_READ, Linux >= 5.14) rather than a
        page fault per 4 KB page as they are read; a no-op where the kernel lacks it."""
        begin = (self.address + first * self.row_bytes) // self.page * self.page
        end = self.address + last * self.row_bytes
        _LIBC.madvise(ctypes.c_void_p(begin), ctypes.c_size_t(end - begin), MADV_POPULATE_READ)

    def release(self, first: int, last: int) -> bool:
        """Drop the resident pages wholly inside rows [first, last), if all hold the file's bytes."""
        begin = -(-(self.address + first * self.row_bytes) // self.page) * self.page
        end = (self.address + last * self.row_bytes) // self.page * self.page
        if end <= begin:
            return False
        entries = self._flags(begin, end)
        if entries is None:
            return False
        # bits 63 present, 62 swapped, 61 a page of the file (int64: bit 63 is the sign)
        present, swapped, file_page = entries < 0, (entries >> 62) & 1 == 1, (entries >> 61) & 1 == 1
        if bool((swapped | (present & ~file_page)).any()):
            return False
        return _LIBC.madvise(ctypes.c_void_p(begin), ctypes.c_size_t(end - begin), MADV_DONTNEED) == 0


_HANDING_BACK: weakref.WeakSet = weakref.WeakSet()


def hand_back_after_lookups(embedding: nn.Module) -> None:
    """After each lookup, the pages of an embedding mapped from its checkpoint go back (the rows
    read were copied out). The kernel maps whole neighbourhoods around every row a lookup reads
    (fault-around): a few thousand distinct tokens leave most of a large vocabulary resident
    (Gemma-3 270M: 0.4 of its 0.67 GB over the demo's evaluation). ~5 ms a lookup on Gemma-3;
    once per module; nothing for an embedding in ordinary memory."""
    weight = getattr(embedding, "weight", None)
    pages = FilePages.of(weight) if isinstance(weight, torch.Tensor) else None
    if pages is None or embedding in _HANDING_BACK:
        return
    _HANDING_BACK.add(embedding)

    def hand_back(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        pages.release(0, pages.rows)  # (a hook's return value would replace the output)

    embedding.register_forward_hook(hand_back)


def _libc() -> Any:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to trim
        return None


_LIBC = _libc()


def _place(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Make `tensor` the parameter `name` of `module` (replacing, not copying into, the old one)."""
    path, _, leaf = name.rpartition(".")
    owner = module.get_submodule(path) if path else module
    requires_grad = owner._parameters[leaf].requires_grad  # type: ignore[union-attr]
    owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=requires_grad)


def open_streamed(
    folder: str | Path, dtype: torch.dtype, device: str, trust_remote_code: bool = False
) -> StreamedModel:
    """The skeleton of the model in `folder` (nothing of its weights read yet) and its reader."""
    reader = WeightReader(folder)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.eval()
    target = torch.device(device)
    stored = {name for name, _ in model.named_buffers()} & set(model.state_dict(keep_vars=True))
    for prefix, module in model.named_modules():
        # Buffers (rotary frequencies, Gemma's embedding scale) are real: as the config makes
        # them, or as the checkpoint stores them (persistent ones), as `from_pretrained` loads them.
        for name, buffer in list(module._buffers.items()):
            full = f"{prefix}.{name}" if prefix else name
            if full in stored and full in reader:
                buffer = reader.read(full)
            if buffer is not None:
                module._buffers[name] = buffer.to(target)
    streamed = StreamedModel(model, reader, dtype, target, {id(m): n for n, m in model.named_modules()})
    streamed.check(reader)
    streamed.materialize_outside()
    model._cps_streamed = streamed  # how the engine and the evaluation recognise a streamed model
    return streamed


def streamed(model: nn.Module) -> StreamedModel | None:
    return getattr(model, "_cps_streamed", None)


def loaded_bytes(folder: str | Path, dtype: torch.dtype) -> int:
    """The memory the weights in `folder` take once loaded in `dtype`, from the safetensors headers:
    each floating-point tensor at `dtype`'s element size (a bf16 checkpoint loaded in float32 takes
    twice its files), any other as stored."""
    total = 0
    for path in Path(folder).glob("*.safetensors"):
        header, _ = _header(path)
        for name, info in header.items():
            if name == "__metadata__":
                continue
            stored = _DTYPES.get(info["dtype"])  # one cps does not read (fp8, unsigned): as stored
            begin, end = info["data_offsets"]
            floating = stored is not None and stored.is_floating_point
            total += math.prod(info["shape"]) * dtype.itemsize if floating else end - begin
    return total


def wants_stream(name: str, options: LoadOptions) -> bool:
    """`options.stream`, or when unset: stream when the weights, in the dtype they would be loaded
    in (`placement`), would not fit in 60% of the free memory (tiny test models never do)."""
    if options.stream is not None:
        return options.stream
    spec = resolve_model(name)
    if spec.source == "tiny":
        return False
    return stream_by_default(loaded_bytes(weights_folder(spec), placement(options).dtype), name)


def load(name: str, options: LoadOptions, tokenizer: bool = True) -> LoadedModel:
    """The model in memory (`cps.models.load_model`), or streamed when `wants_stream`; with its
    tokenizer only if `tokenizer`."""
    if not wants_stream(name, options):
        return load_model(name, options, tokenizer)
    return open_loaded(name, weights_folder(resolve_model(name)), options, tokenizer)


def open_loaded(name: str, folder: str | Path, options: LoadOptions, tokenizer: bool = True) -> LoadedModel:
    """A streamed model of the weights in `folder`, with the tokenizer of model `name` (or None:
    Gemma-3's takes 0.12 GB and seconds, and pruning does not need it). It computes where
    `placement(options)` says, in its dtype; it holds no weights (`hold_on_cpu` does not apply)."""
    where = placement(options)
    streamed_model = open_streamed(folder, where.dtype, where.compute, options.trust_remote_code)
    streamed_model.offload = options.offload_activations
    loaded_tokenizer = load_tokenizer(name, options.trust_remote_code) if tokenizer else None
    return LoadedModel(resolve_model(name), streamed_model.model, loaded_tokenizer)  # type: ignore[arg-type]


def model_device(model: nn.Module) -> torch.device:
    """Where the model computes (a streamed model's parameters sit on the meta device)."""
    source = streamed(model)
    return source.device if source is not None else next(model.parameters()).device


def stream_by_default(size: int, name: str) -> bool:
    """True (with one line saying so) when weights of `size` bytes would take more than 60% of
    the memory free now."""
    free = psutil.virtual_memory().available
    if size <= STREAM_SHARE * free:
        return False
    log.warning(
        "streaming %s layer by layer: its weights (%.1f GB) exceed %d%% of free memory (%.1f GB); "
        "--no-stream loads it whole",
        name,
        size / 1e9,
        int(STREAM_SHARE * 100),
        free / 1e9,
    )
    return True


# ---------------------------------------------------------------------------------------------
# Each layer's call, and the activations between layers


@dataclass
class LayerCalls:
    """Layer-0 hidden states per batch, and each layer's own keyword arguments per batch shape."""

    hidden: ActivationBuffer
    kwargs: list[dict[tuple[int, ...], dict[str, Any]]]  # per layer: (b, seqlen) -> call kwargs

    def kwargs_for(self, layer: int, batch: torch.Tensor) -> dict[str, Any]:
        return self.kwargs[layer][tuple(batch.shape[:2])]


def move(value: Any, device: torch.device | str, memo: dict[int, Any]) -> Any:
    """Tensors (also inside tuples, lists, dicts) to `device`; shared objects are moved once."""
    if id(value) in memo:
        return memo[id(value)]
    if isinstance(value, torch.Tensor):
        moved = value.to(device)
    elif isinstance(value, tuple | list):
        moved = type(value)(move(item, device, memo) for item in value)
    elif isinstance(value, dict):
        moved = {key: move(item, device, memo) for key, item in value.items()}
    else:
        moved = value
    memo[id(value)] = moved
    return moved


@contextmanager
def _recording(layers: nn.ModuleList, sink: Callable[[int, tuple, dict], None]) -> Iterator[None]:
    """Replace each layer's forward by a recorder that passes hidden states through untouched."""

    def recorder(index: int) -> Callable[..., Any]:
        def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            sink(index, (hidden_states, *args), kwargs)
            return hidden_states

        return forward

    for index, layer in enumerate(layers):
        layer.forward = recorder(index)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward  # back to the class's forward


def capture_layer_calls(
    model: nn.Module, batches: list[torch.Tensor], device: torch.device | str, offload: bool = False
) -> LayerCalls:
    """Run the base model with recording layers over each batch of token ids: the embeddings,
    masks and rotary embeddings are computed by the model's own code, so every layer gets exactly
    what it would in a real forward. A streamed model reads only the embedding rows it needs; an
    embedding mapped from its checkpoint gives its pages back after each lookup
    (`hand_back_after_lookups`: ~0.45 GB of Gemma-3's 0.67 GB for 16k Swahili tokens otherwise)."""
    layers = decoder_layers(model)
    base = model.base_model
    source = streamed(model)
    calls = LayerCalls(hidden=ActivationBuffer(offload), kwargs=[{} for _ in layers])
    if source is None:
        hand_back_after_lookups(base.get_input_embeddings())
    for batch in batches:
        shape = tuple(batch.shape[:2])

        def sink(index: int, args: tuple, kwargs: dict, shape: tuple = shape) -> None:
            if index == 0:
                calls.hidden.append(args[0].detach().to(device))
            if shape not in calls.kwargs[index]:
                kwargs = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values")}
                calls.kwargs[index][shape] = kwargs

        with _recording(layers, sink):
            if source is None:
                embed_device = base.get_input_embeddings().weight.device
                base(input_ids=batch.to(embed_device), use_cache=False)
            else:
                with source.embedding_rows(batch) as local:
                    base(input_ids=local.to(source.device), use_cache=False)
    memo: dict[int, Any] = {}
    calls.kwargs = [move(per_shape, device, memo) for per_shape in calls.kwargs]
    return calls


class ActivationBuffer:
    """Every batch's hidden states between two layers: in memory, or (`offload`) each batch in a
    file of a temporary folder, so that only the batch being computed is in memory."""

    def __init__(self, offload: bool = False) -> None:
        self.offload = offload
        self._items: list[torch.Tensor | None] = []
        self._folder = Path(tempfile.mkdtemp(prefix="cps-activations-")) if offload else None
        self._devices: list[torch.device] = []

    def __len__(self) -> int:
        return len(self._items)

    def _path(self, index: int) -> Path:
        assert self._folder is not None
        return self._folder / f"{index}.safetensors"

    def append(self, tensor: torch.Tensor) -> None:
        self._items.append(None)
        self._devices.append(tensor.device)
        self[len(self._items) - 1] = tensor

    def __getitem__(self, index: int) -> torch.Tensor:
        if not self.offload:
            item = self._items[index]
            assert item is not None
            return item
        return load_file(str(self._path(index)))["h"].to(self._devices[index])

    def __setitem__(self, index: int, tensor: torch.Tensor) -> None:
        if not self.offload:
            self._items[index] = tensor
            return
        self._devices[index] = tensor.device
        save_file({"h": tensor.detach().cpu().contiguous()}, str(self._path(index)))

    def __iter__(self) -> Iterator[torch.Tensor]:
        for index in range(len(self)):
            yield self[index]

    def close(self) -> None:
        self._items.clear()
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)

    def __del__(self) -> None:
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
