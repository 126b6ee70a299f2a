"""The settings of every stage: one frozen dataclass per concept, validated once when it is built.

Field names are the CLI flags and the keys of a study file (`max_docs` is `--max-docs` and
`max_docs = 6` under `[eval]`). The CLI builds these from flags, `cps.study` from TOML (one
`dataclasses.replace` per cell); the stages only receive them. Adding an option is one field here
plus its flag in `cps/cli/`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, replace

from cps.errors import CpsError
from cps.languages import PAPER_LANGUAGES, get_language, mixture_label, parse_mixture
from cps.metrics import split_task
from cps.models import DEFAULT_MODEL, LoadOptions, dtype_name, resolve_dtype, resolve_model
from cps.pruning.base import MethodOptions, method_class, refinement_class
from cps.pruning.engine import EngineConfig, OwlAllocation, PrunePlan
from cps.pruning.masks import SparsityTarget
from cps.pruning.quant import QuantGrid

DENSE = "dense"  # the `method` param of the dense baseline's run, which prunes nothing
PROTOCOL_VERSION = 2  # held-out scoring (cps.evaluation.windows); 1: one stream, BOS only first
EVAL_FINGERPRINT_TAG = "cps.eval.fingerprint"
FINDINGS_DELTA_TAG = "cps.findings_delta"  # on a sweep run: its study's [findings] delta


ALLOCATIONS = ("uniform", "owl")
QUANTIZERS = ("gptq", "rtn")  # what quantizes after a pruning method (`--quant`, with `--bits`)


def combination_error(
    method: str, pattern: str, allocation: str = "uniform", refine: str = "none", bits: int | None = None
) -> str | None:
    """Why a method cannot run with this pattern, allocation, refinement or quantization (one
    line), else None. A study's grid leaves such cells out and names them; a command refuses them."""
    cls = method_class(method)
    structured = pattern != "unstructured"
    if cls.quantizes and bits is None:
        return f"{method} quantizes: give --bits (2 to 8)"
    if cls.quantizes and (structured or allocation != "uniform" or refine != "none"):
        return f"{method} quantizes the dense weights: no --pattern, --allocation or --refine"
    if bits is not None and cls.removes_layers:
        return f"{method} removes whole layers; quantize its model with cps quantize instead of --bits"
    if structured and not cls.supports_nm:
        return f"{method} has no N:M form: use --pattern unstructured"
    if allocation == "owl" and cls.removes_layers:
        return f"{method} removes whole layers: OWL allocates sparsity within them (use --allocation uniform)"
    if allocation == "owl" and structured:
        return f"OWL allocates unstructured sparsity; {pattern} fixes every layer's share"
    if refine != "none" and (cls.updates_weights or cls.removes_layers):
        what = "changes the kept weights" if cls.updates_weights else "removes whole layers"
        return f"--refine {refine} refines a mask over the dense weights; {method} {what}"
    return None


def variant(
    method: str, allocation: str | None = "uniform", refine: str | None = "none", quant: str | None = None
) -> str:
    """A method with what runs around it, as tables name it: wanda, wanda+owl, wanda+owl+dsnot,
    gptq-w4g128, sparsegpt+gptq-w4g128 (`quant`: `quant_label`). Runs logged before allocations
    and refinements existed have neither param (uniform, none)."""
    parts = [method]
    if allocation not in (None, "", "uniform"):
        parts.append(str(allocation))
    if refine not in (None, "", "none"):
        parts.append(str(refine))
    if quant:
        parts = [quant] if quant.split("-")[0] == method else [*parts, quant]
    return "+".join(parts)


def updates_weights(params: Mapping[str, object]) -> bool:
    """Whether a run's weights are other than the dense ones x its masks (its method updates them,
    or they were quantized): such a run is rebuilt by pruning again, and a sweep keeps its weights."""
    return method_class(str(params["method"])).updates_weights or quant_label(params) is not None


def same_quantization(wanted: Mapping[str, object], logged: Mapping[str, object]) -> bool:
    """A run found by a subset of its params is the one wanted only if both are quantized or
    neither: an unquantized run's params (no `bits`) are a subset of its quantized twin's."""
    return ("bits" in wanted) == ("bits" in logged)


def run_variant(params: Mapping[str, object]) -> str:
    """A run's `variant` from its logged params: wanda+owl, gptq-w4g128, sparsegpt+gptq-w4g128;
    a run that quantized another run's pruned model (`from_run`) reads `<its variant>|gptq-w4g128`."""
    label = quant_label(params)
    if params.get("from_method"):
        return f"{params['from_method']}|{label}"
    return variant(str(params.get("method", "")), params.get("allocation"), params.get("refine"), label)  # type: ignore[arg-type]


def quant_label(params: Mapping[str, object]) -> str | None:
    """A quantized run's quantizer and grid from its params (gptq-w4g128, rtn-w3a), else None."""
    if params.get("bits") in (None, "", "None", "none"):
        return None
    sym = str(params.get("sym", True)) not in ("False", "false", "0")
    grid = QuantGrid(int(str(params["bits"])), int(str(params.get("group_size", 128))), sym)
    return f"{params.get('quant', params.get('method'))}-{grid.label}"


def default_stride(seqlen: int) -> int:
    """The window step inside a long held-out document when none is given."""
    return max(1, seqlen // 2)


@dataclass(frozen=True)
class CalibrationConfig:
    """`cps calibrate`: `nsamples` random windows of `seqlen` tokens of `lang`, tokenized for `model`."""

    model: str = DEFAULT_MODEL
    lang: str = "en"  # a code, a mixture 'en:0.5,sw:0.5', or a recipe 'sw+en' / 'all'
    corpus: str = "ntrex"  # or 'self': text the dense model samples itself (cps.data.selfgen)
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    data_dir: str | None = None

    def __post_init__(self) -> None:
        if self.nsamples < 1:
            raise CpsError(f"--nsamples must be at least 1 (got {self.nsamples})")
        if self.seqlen < 2:
            raise CpsError(f"--seqlen must be at least 2 (got {self.seqlen})")
        if self.seed < 0:
            raise CpsError(f"--seed must be non-negative (got {self.seed})")
        parse_mixture(self.lang)
        resolve_model(self.model)

    @property
    def mixture(self) -> dict[str, float]:
        return parse_mixture(self.lang)


@dataclass(frozen=True)
class PruneConfig:
    """`cps prune`: one model pruned by one method on one calibration set, or, with `method=None`,
    the dense baseline (nothing pruned, no calibration). The calibration comes from `calibration`
    or from the calibrate run `calib_run`."""

    model: str = DEFAULT_MODEL
    method: str | None = "wanda"
    calibration: CalibrationConfig | None = None
    pattern: str = "unstructured"
    sparsity: float | None = None  # unstructured: default 0.5; N:M: implied, 1 - N/M
    blocksize: int = 128
    dampening: float = 0.01
    device: str = "cpu"
    dtype: str = "auto"
    true_sequential: bool = False
    offload_activations: bool = False
    batch_tokens: int = 2048
    calib_run: str | None = None
    save_model: bool = True
    stream: bool | None = None  # layer streaming from the shards; None: when the model would not fit
    allocation: str = "uniform"  # uniform | owl: the sparsity of each decoder layer
    owl_m: float = 5.0  # OWL: outliers are scores above M times their layer's mean
    owl_lambda: float = 0.08  # OWL: layer sparsities spread over a range 2 x lambda wide, mean the target
    refine: str = "none"  # a mask refinement after the method: none | dsnot
    ria_a: float = 0.5
    dsnot_cycles: int = 50
    dsnot_threshold: float = 0.1
    dsnot_var_power: float = 1.0
    dsnot_skip: str = "mlp"
    # Weight quantization (`cps quantize`; `--bits` on `cps prune`: after pruning, or joint with SparseGPT)
    bits: int | None = None
    group_size: int = 128  # -1: one scale per output channel
    sym: bool = True
    act_order: bool = False
    quant: str = "gptq"  # what quantizes after a pruning method: gptq | rtn
    from_run: str | None = None  # `cps quantize --from-run`: quantize this prune run's model, its zeros held

    def __post_init__(self) -> None:
        resolve_model(self.model)
        if self.method is None:
            if self.calibration is not None or self.calib_run:
                raise CpsError("the dense baseline prunes nothing and takes no calibration")
            if self.bits is not None:
                raise CpsError("the dense baseline is not quantized: --bits needs a method")
        else:
            self._check_method()
            if self.calibration is None and self.calib_run is None:
                raise CpsError("--lang is required (the calibration language), unless --calib RUN_ID")
            if self.calibration is not None and self.calibration.model != self.model:
                raise CpsError(f"calibration for {self.calibration.model!r} given to prune {self.model!r}")
        if self.batch_tokens < 1:
            raise CpsError(f"--batch-tokens must be positive (got {self.batch_tokens})")
        self.target, self.options  # noqa: B018  (validated here, used later)
        LoadOptions(self.dtype, self.device)

    def _check_method(self) -> None:
        """The method exists and takes the pattern, allocation and refinement asked for: an
        impossible combination fails before any work (`combination_error` says why)."""
        method_class(str(self.method))  # unknown methods fail first
        if self.allocation not in ALLOCATIONS:
            raise CpsError(f"unknown allocation {self.allocation!r}; use {' or '.join(ALLOCATIONS)}")
        if self.owl_m <= 0:
            raise CpsError(f"--owl-m must be positive (got {self.owl_m:g})")
        if not 0 < self.owl_lambda < 0.5:
            raise CpsError(f"--owl-lambda must be in (0, 0.5) (got {self.owl_lambda:g})")
        if self.allocation == "owl" and self.target.sparsity + 2 * self.owl_lambda >= 1:
            raise CpsError(  # a layer may get up to S + 2 lambda: refused before any work
                f"OWL at sparsity {self.target.sparsity:g} with lambda {self.owl_lambda:g} could prune a "
                f"whole layer (up to S + 2 x lambda): lower --owl-lambda below "
                f"{(1 - self.target.sparsity) / 2:g}"
            )
        if self.refine != "none":
            refinement_class(self.refine)
        if self.quant not in QUANTIZERS:
            raise CpsError(f"unknown quantizer {self.quant!r}; use {' or '.join(QUANTIZERS)}")
        self.grid  # noqa: B018  (validated)
        problem = combination_error(str(self.method), self.pattern, self.allocation, self.refine, self.bits)
        if problem:
            raise CpsError(problem)
        if self.act_order and self.bits is not None and self.quantizer_name != "gptq":
            raise CpsError(f"--act-order orders GPTQ's columns; {self.variant} has no column order to change")
        if self.from_run is not None and not self.quantizes:
            raise CpsError(
                "--from-run quantizes a pruned run's model: it takes a quantization method (gptq, rtn)"
            )
        if self.quantizes and self.sparsity not in (None, 0, 0.0):
            raise CpsError(f"{self.method} quantizes and prunes nothing: to prune too, cps prune --bits")

    @property
    def grid(self) -> QuantGrid | None:
        """The grid the weights are rounded to (None unquantized)."""
        return None if self.bits is None else QuantGrid(self.bits, self.group_size, self.sym)

    @property
    def quantizes(self) -> bool:
        """The method itself is a quantizer (gptq, rtn): `cps quantize`."""
        return self.method is not None and method_class(self.method).quantizes

    @property
    def quantizer_name(self) -> str | None:
        """What rounds the weights: gptq, rtn, or sparsegpt's own loop (joint); None unquantized."""
        if not self.quantized:
            return None
        if self.quantizes:
            return self.method
        return "sparsegpt" if self.joint else self.quant

    @property
    def quantized(self) -> bool:
        return self.method is not None and self.bits is not None

    @property
    def joint(self) -> bool:
        """SparseGPT with --bits (and GPTQ's error feedback): quantized in its own column loop."""
        method = self.method
        joint = method is not None and method_class(method).joint_quantization
        return self.bits is not None and joint and self.quant == "gptq"

    @property
    def dense(self) -> bool:
        return self.method is None

    @property
    def plan(self) -> PrunePlan:
        """The allocation and refinement around the method, for the engine."""
        allocation = OwlAllocation(self.owl_m, self.owl_lambda) if self.allocation == "owl" else None
        refinement = None if self.refine == "none" else refinement_class(self.refine)(self.options)
        quantizer = None
        if self.quantized and not self.quantizes and not self.joint:  # prune, then quantize
            quantizer = method_class(self.quant)(replace(self.options, bits=self.bits))
        return PrunePlan(allocation, refinement, quantizer)

    @property
    def load_options(self) -> LoadOptions:
        return LoadOptions(
            self.dtype, self.device, stream=self.stream, offload_activations=self.offload_activations
        )

    @property
    def method_name(self) -> str:
        return self.method or DENSE

    @property
    def variant(self) -> str:
        return variant(self.method_name, self.allocation, self.refine, quant_label(self.quant_params))

    @property
    def quant_params(self) -> dict[str, object]:
        """A quantized run's quantization params (none for the others, as for every run before)."""
        if not self.quantized:
            return {}
        quant = self.method if self.quantizes else self.quant
        params: dict[str, object] = {"bits": self.bits, "group_size": self.group_size, "sym": self.sym}
        if self.quantizer_name == "gptq":  # the options of a GPTQ that runs after a pruning method too
            params |= {"act_order": self.act_order, "blocksize": self.blocksize, "dampening": self.dampening}
        return params | {"quant": quant}

    @property
    def target(self) -> SparsityTarget:
        if self.dense or self.quantizes:
            return SparsityTarget(0.0)
        default = 0.5 if self.sparsity is None and self.pattern == "unstructured" else self.sparsity
        return SparsityTarget.parse(self.pattern, default)

    @property
    def options(self) -> MethodOptions:
        return MethodOptions(
            self.blocksize,
            self.dampening,
            self.ria_a,
            self.dsnot_cycles,
            self.dsnot_threshold,
            self.dsnot_var_power,
            self.dsnot_skip,
            # the method quantizes with these only where it is the quantizer (or joint); a
            # quantizer after it gets them from `plan`
            bits=self.bits if self.quantizes or self.joint else None,
            group_size=self.group_size,
            sym=self.sym,
            act_order=self.act_order,
            scale_dtype=resolve_dtype(self.dtype, self.device) if self.bits is not None else None,
        )

    @property
    def engine(self) -> EngineConfig:
        return EngineConfig(self.device, self.true_sequential, self.offload_activations, self.batch_tokens)

    def identity(self, calibration: CalibrationConfig | None = None) -> dict[str, object]:
        """The params of its run that follow from the settings alone (all but `model_id` and
        `calib_hash`): the run logs them, and a sweep finds a cell's finished run by them.
        `calibration` is the one actually used (a reused calibrate run's), default the config's.
        `dtype` is the one pruned in (`auto` resolved for `device`): an evaluation that prunes
        the run again does so in it."""
        calibration = calibration or self.calibration
        params: dict[str, object] = {"model": self.model}
        if calibration is None:  # the dense baseline: no calibration involved
            params |= {"seed": 0, "calib_lang": "none", "calib_corpus": "none", "nsamples": 0, "seqlen": 0}
        else:
            params |= {
                "seed": calibration.seed,
                "calib_lang": mixture_label(calibration.mixture),
                "calib_corpus": calibration.corpus,
                "nsamples": calibration.nsamples,
                "seqlen": calibration.seqlen,
            }
        target = self.target
        params |= {
            "method": self.method_name,
            "sparsity": target.sparsity,
            "pattern": target.pattern,
            "true_sequential": self.true_sequential,
            "dtype": dtype_name(resolve_dtype(self.dtype, self.device)),
        }
        if self.method is not None:  # the options that shape this method's result
            options = self.options
            params |= {name: getattr(options, name) for name in method_class(self.method).logged_options}
            params |= {"allocation": self.allocation, "refine": self.refine}
            if self.allocation == "owl":
                params |= {"owl_m": self.owl_m, "owl_lambda": self.owl_lambda}
            if self.refine != "none":
                logged = refinement_class(self.refine).logged_options
                params |= {name: getattr(options, name) for name in logged}
            params |= self.quant_params
            if self.from_run is not None:  # (the run's model, sparsity and method: `run_prune` adds them)
                params["from_run"] = self.from_run
        return params


@dataclass(frozen=True)
class EvalConfig:
    """`cps eval`: perplexity (and the held-out SNR) in `langs`, and zero-shot `tasks`."""

    langs: tuple[str, ...] = PAPER_LANGUAGES
    tasks: tuple[str, ...] = ()
    corpus: str = "flores"
    seqlen: int = 1024  # tokens per held-out window, BOS included
    stride: int | None = None  # window step inside a long document (default seqlen // 2)
    max_docs: int | None = None  # perplexity: the first N held-out documents per language
    limit: float | None = None  # tasks: items per task (or a fraction)
    task_limits: tuple[tuple[str, float], ...] = ()  # per family or task, overriding `limit`
    skip_missing: bool = False  # leave out (family, language) pairs lm-eval has no task for
    batch_size: int = 8
    device: str = "cpu"
    dtype: str = "auto"
    data_dir: str | None = None
    stream: bool | None = None  # layer streaming from the shards; None: when the model would not fit
    offload_activations: bool = False  # streamed: activations between layers in files

    @property
    def load_options(self) -> LoadOptions:
        return LoadOptions(
            self.dtype, self.device, stream=self.stream, offload_activations=self.offload_activations
        )

    def __post_init__(self) -> None:
        for lang in self.langs:
            get_language(lang)
        if self.seqlen < 2:
            raise CpsError(f"--seqlen must be at least 2 (got {self.seqlen})")
        if self.stride is not None and not 1 <= self.stride < self.seqlen:
            raise CpsError(f"--stride must be between 1 and --seqlen - 1 (got {self.stride})")
        if self.max_docs is not None and self.max_docs < 1:
            raise CpsError(f"--max-docs must be positive (got {self.max_docs})")
        if self.limit is not None and self.limit <= 0:
            raise CpsError(f"--limit must be positive (got {self.limit:g})")
        for name, value in self.task_limits:
            if not isinstance(value, int | float) or value <= 0:
                raise CpsError(f"the item limit for {name!r} must be a positive number (got {value!r})")
        if self.batch_size < 1:
            raise CpsError(f"--batch-size must be positive (got {self.batch_size})")
        LoadOptions(self.dtype, self.device)

    def limit_for(self, task: str) -> float | None:
        """Items to score for `task`: its own limit, its family's, else `limit`."""
        limits = dict(self.task_limits)
        return limits.get(task, limits.get(split_task(task)[0], self.limit))

    def fingerprint(self) -> str:
        """What was measured (not where or how fast): a sweep's cell is complete when its run carries
        this; a new protocol changes it, so old runs are evaluated again instead of mixed in."""
        what = {
            "langs": sorted(self.langs),
            "tasks": sorted(self.tasks),
            "corpus": self.corpus,
            "seqlen": self.seqlen,
            "stride": self.stride or default_stride(self.seqlen),
            "protocol": PROTOCOL_VERSION,
            "limit": self.limit,
            "task_limits": sorted(self.task_limits),
            "max_documents": self.max_docs,
        }
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class AnalyzeConfig:
    """`cps analyze`: groups of prune runs that differ only in `group_by`, compared; with
    `activations`, on held-out text windowed as `cps eval` windows it."""

    group_by: str = "calib_lang"
    filters: tuple[tuple[str, str], ...] = ()
    activations: bool = False  # LAPE, LSAR and cross-language SNR on held-out text
    langs: tuple[str, ...] = PAPER_LANGUAGES
    corpus: str = "flores"
    seqlen: int = 512  # tokens per held-out window, BOS included
    stride: int | None = None  # window step inside a long document (default seqlen // 2)
    max_docs: int | None = None  # per language, for quick runs
    lape_ratio: float = 0.01
    lsar_rank: int | None = None  # default: languages - 1
    device: str = "cpu"
    data_dir: str | None = None

    def __post_init__(self) -> None:
        for lang in self.langs:
            get_language(lang)
        if self.activations and len(self.langs) < 2:
            raise CpsError("activation analyses compare languages: give at least two --langs")
        if self.stride is not None and not 1 <= self.stride < self.seqlen:
            raise CpsError(f"--stride must be between 1 and --seqlen - 1 (got {self.stride})")
        if self.max_docs is not None and self.max_docs < 1:
            raise CpsError(f"--max-docs must be positive (got {self.max_docs})")
        if not 0 < self.lape_ratio < 1:
            raise CpsError(f"--lape-ratio must be in (0, 1) (got {self.lape_ratio:g})")
