"""The settings of every stage: one frozen dataclass per concept, validated once when it is built.

Field names are the CLI flags and the keys of a study file (`max_docs` is `--max-docs` and
`max_docs = 6` under `[eval]`). The CLI builds these from flags, `cps.study` from TOML (one
`dataclasses.replace` per cell); the stages only receive them. Adding an option is one field here
plus its flag in `cps/cli/`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from cps.errors import CpsError
from cps.languages import PAPER_LANGUAGES, get_language, mixture_label, parse_mixture
from cps.metrics import split_task
from cps.models import DEFAULT_MODEL, LoadOptions, dtype_name, resolve_dtype, resolve_model
from cps.pruning.base import MethodOptions, method_class
from cps.pruning.engine import EngineConfig
from cps.pruning.masks import SparsityTarget

DENSE = "dense"  # the `method` param of the dense baseline's run, which prunes nothing
PROTOCOL_VERSION = 2  # held-out scoring (cps.evaluation.windows); 1: one stream, BOS only first
EVAL_FINGERPRINT_TAG = "cps.eval.fingerprint"
FINDINGS_DELTA_TAG = "cps.findings_delta"  # on a sweep run: its study's [findings] delta


def default_stride(seqlen: int) -> int:
    """The window step inside a long held-out document when none is given."""
    return max(1, seqlen // 2)


@dataclass(frozen=True)
class CalibrationConfig:
    """`cps calibrate`: `nsamples` random windows of `seqlen` tokens of `lang`, tokenized for `model`."""

    model: str = DEFAULT_MODEL
    lang: str = "en"  # a code, or a mixture 'en:0.5,sw:0.5'
    corpus: str = "ntrex"
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

    def __post_init__(self) -> None:
        resolve_model(self.model)
        if self.method is None:
            if self.calibration is not None or self.calib_run:
                raise CpsError("the dense baseline prunes nothing and takes no calibration")
        else:
            method_class(self.method)  # unknown methods fail before any work
            if self.calibration is None and self.calib_run is None:
                raise CpsError("--lang is required (the calibration language), unless --calib RUN_ID")
            if self.calibration is not None and self.calibration.model != self.model:
                raise CpsError(f"calibration for {self.calibration.model!r} given to prune {self.model!r}")
        if self.batch_tokens < 1:
            raise CpsError(f"--batch-tokens must be positive (got {self.batch_tokens})")
        self.target, self.options  # noqa: B018  (validated here, used later)
        LoadOptions(self.dtype, self.device)

    @property
    def dense(self) -> bool:
        return self.method is None

    @property
    def load_options(self) -> LoadOptions:
        return LoadOptions(
            self.dtype, self.device, stream=self.stream, offload_activations=self.offload_activations
        )

    @property
    def method_name(self) -> str:
        return self.method or DENSE

    @property
    def target(self) -> SparsityTarget:
        if self.dense:
            return SparsityTarget(0.0)
        default = 0.5 if self.sparsity is None and self.pattern == "unstructured" else self.sparsity
        return SparsityTarget.parse(self.pattern, default)

    @property
    def options(self) -> MethodOptions:
        return MethodOptions(self.blocksize, self.dampening)

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
