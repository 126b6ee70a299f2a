"""Token perplexity and bits per byte of held-out documents (FLORES dev+test by default).

The text is scored under the protocol of `cps.evaluation.windows`: each document on its own, every
window starting with the tokenizer's BOS, every document token scored exactly once.

    ppl = exp(sum NLL / scored tokens)      bpb = sum NLL / ln 2 / UTF-8 bytes of the scored text

Bits per byte are comparable across tokenizers and languages; perplexity is not. The result keeps
each document's NLL, tokens and bytes, from which both are recomputed exactly.

The LM head and its log-softmax run on the scored positions only, over the vocabulary in chunks
(an online log-sum-exp) with at most `HEAD_BUDGET_BYTES` of fp32 logits at once: never a
[batch, seqlen, vocab] tensor (Gemma-3's vocabulary has 262k entries). A streamed model
(`cps.streaming`) runs the same arithmetic one decoder layer at a time over every window. A
`LayerObserver` sees every decoder layer's hidden states at the scored positions of the same
forward pass (the held-out SNR against the dense model needs no extra pass).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import polars as pl
import torch

from cps.data.corpus import Document
from cps.errors import CpsError
from cps.evaluation.windows import Batch, HeldOutText, Window, batches, held_out_windows
from cps.hooks import layer_output, output_hooks
from cps.models import decoder_layers
from cps.streaming import (
    FilePages,
    StreamedModel,
    capture_layer_calls,
    hand_back_after_lookups,
    move,
    streamed,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

HEAD_BUDGET_BYTES = 32 << 20  # fp32 logits held at once
# rows of the LM head per step of the online log-sum-exp: 4096 x 640 fp32 (Gemma-3) stays in the
# CPU's cache while 2048 positions run against it (~12% faster than 16384 x 512 on 2 cores)
VOCAB_CHUNK = 4096
BATCH_TOKENS = 8192  # window tokens (b x L) per forward


@dataclass
class PerplexityResult:
    documents: list[str]  # document ids
    nll: list[float]  # summed negative log-likelihood per document, nats
    tokens: list[int]  # scored tokens per document
    bytes: list[int]  # UTF-8 bytes of each document's scored text

    @property
    def total_nll(self) -> float:
        return math.fsum(self.nll)

    @property
    def total_tokens(self) -> int:
        return sum(self.tokens)

    @property
    def ppl(self) -> float:
        return math.exp(self.total_nll / self.total_tokens)

    @property
    def bpb(self) -> float:
        return self.total_nll / math.log(2) / sum(self.bytes)

    def frame(self) -> pl.DataFrame:
        """Per-document results (`items/ppl_<lang>.parquet`): document, nll, tokens, bytes."""

        return pl.DataFrame(
            {"document": self.documents, "nll": self.nll, "tokens": self.tokens, "bytes": self.bytes},
            schema={"document": pl.String, "nll": pl.Float64, "tokens": pl.Int64, "bytes": pl.Int64},
        )


class LayerObserver:
    """Sees each decoder layer's hidden states at the scored positions of every batch."""

    def begin(self, batch: Batch) -> None:
        """States of `batch` follow (its `scored` mask orders them). An in-memory pass calls it once
        per batch before all its layers; a streamed pass before each (layer, batch): layer-major."""

    def layer(self, index: int, states: torch.Tensor) -> None:
        """(n, d) states of layer `index` at the batch's scored positions, row by row."""


class OutputHead:
    """The model's LM head applied to chosen positions, as its own forward applies it: the output
    projection, then Gemma's final logit soft-capping or Cohere's logit scale where configured.

    The log-softmax runs over the vocabulary in chunks of `VOCAB_CHUNK` rows (an online
    log-sum-exp), on at most `HEAD_BUDGET_BYTES` of fp32 logits at once: a streamed model reads
    its head weights one chunk at a time, and an in-memory model runs exactly the same arithmetic,
    so both give the same bits."""

    def __init__(self, model: PreTrainedModel) -> None:
        config = model.config.get_text_config()
        self.softcap = getattr(config, "final_logit_softcapping", None)
        scale = getattr(model, "logit_scale", None)
        self.scale = float(scale) if isinstance(scale, int | float) else None
        self.source = streamed(model)
        linear = model.get_output_embeddings()
        self.bias = None if self.source is not None else linear.bias
        self.weight = None if self.source is not None else linear.weight
        self.vocab = int(linear.weight.shape[0])
        # A checkpoint mapped in place: each chunk's rows leave resident memory once used (Gemma-3's
        # tied 262k x 640 head is 0.67 GB of fp32, of which the input embedding touches a few rows).
        self.pages = FilePages.of(self.weight) if self.weight is not None else None
        if self.source is None:
            hand_back_after_lookups(model.get_input_embeddings())

    def rows(self, start: int, stop: int) -> torch.Tensor:
        if self.source is None:
            assert self.weight is not None
            return self.weight[start:stop]
        name = self.source.source_name(self.source.head_name)
        return self.source.reader.rows(name, start, stop).to(self.source.dtype).to(self.source.device)

    def logits(self, states: torch.Tensor, weight: torch.Tensor, start: int = 0) -> torch.Tensor:
        bias = None if self.bias is None else self.bias[start : start + weight.shape[0]]
        logits = torch.nn.functional.linear(states, weight, bias)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        if self.scale is not None:
            logits = logits * self.scale
        return logits

    def nll(self, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(n,) fp32 NLL of each target given the state before it."""
        return self.scores(states, targets, greedy=False)[0]

    def scores(
        self,
        states: torch.Tensor,
        targets: torch.Tensor,
        greedy: bool = True,
        rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(n,) fp32 NLL of each target given the state before it and, with `greedy`, (n,) whether
        each target is the first index of its row's largest logit (torch's argmax over the whole
        vocabulary equals it: lm-eval's `is_greedy`). With `rows`, target i is read from state
        rows[i], so a state shared by several targets (the context's last position, which predicts
        the first token of every choice) runs through the head once; without, target i from state i.

        Greedy needs no argmax: a target is the first maximum exactly when its logit is the row's
        maximum and every logit before it is smaller, so each row keeps its running maximum (the
        log-sum-exp needs it anyway) and the maximum over the indices before its target."""
        count = len(states)
        rows = torch.arange(count, device=states.device) if rows is None else rows
        order = torch.argsort(rows, stable=True)  # each block of states reads one run of targets
        rows, targets = rows[order], targets[order]
        lse = torch.full((count,), -math.inf, device=states.device)
        best = torch.full((count,), -math.inf, device=states.device)
        target_logit = torch.zeros(len(targets), device=states.device)
        before = torch.full((len(targets),), -math.inf, device=states.device) if greedy else None
        step = max(1, HEAD_BUDGET_BYTES // (4 * VOCAB_CHUNK))
        blocks = [(begin, min(begin + step, count)) for begin in range(0, count, step)]
        reads = [
            (int(torch.searchsorted(rows, begin)), int(torch.searchsorted(rows, end)))
            for begin, end in blocks
        ]
        for first in range(0, self.vocab, VOCAB_CHUNK):
            last = min(first + VOCAB_CHUNK, self.vocab)
            weight = self.rows(first, last)
            if self.pages is not None:
                self.pages.populate(first, last)
            for (begin, end), (low, high) in zip(blocks, reads, strict=True):
                logits = self.logits(states[begin:end], weight, first).float()
                local = targets[low:high] - first
                row = rows[low:high] - begin
                inside = ((local >= 0) & (local < last - first)).nonzero()[:, 0]
                target_logit[low + inside] = logits[row[inside], local[inside]]
                peak = logits.amax(dim=1)
                best[begin:end] = torch.maximum(best[begin:end], peak)
                if before is not None:
                    ahead = local >= last - first  # the chunk lies wholly before these targets
                    before[low:high] = torch.where(
                        ahead, torch.maximum(before[low:high], peak[row]), before[low:high]
                    )
                    if len(inside):  # the part of the chunk before the target
                        cut = torch.arange(last - first, device=logits.device) >= local[inside, None]
                        part = logits[row[inside]].masked_fill_(cut, -math.inf).amax(dim=1)
                        before[low + inside] = torch.maximum(before[low + inside], part)
                # the chunk's log-sum-exp, in place (logits is this step's own tensor)
                chunk = logits.sub_(peak[:, None]).exp_().sum(dim=1).log_().add_(peak)
                lse[begin:end] = torch.logaddexp(lse[begin:end], chunk)
            del weight
            if self.pages is not None:
                self.pages.release(first, last)
        nll = torch.empty_like(target_logit)
        nll[order] = lse[rows] - target_logit
        if before is None:
            return nll, None
        flags = torch.empty(len(targets), dtype=torch.bool, device=states.device)
        flags[order] = (target_logit == best[rows]) & (target_logit > before)
        return nll, flags


_HEAD_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


CHECKED_ROWS = 4096  # vocabulary entries the head check compares


@torch.no_grad()
def checked_head(model: PreTrainedModel, sample: torch.Tensor) -> OutputHead | None:
    """The chunked head when it reproduces the model's own logits, else None: the model's full
    forward is used instead. Checked once per model on a few tokens: the model's forward (with its
    soft-capping or scale) runs with its head cut to the first `CHECKED_ROWS` entries, so the check
    reads a sliver of a large head (Gemma-3's 262k x 640 would be 0.67 GB resident at once). A
    streamed model's head is not checked (it cannot run whole): streaming takes the architectures
    whose heads cps knows."""
    if streamed(model) is not None:
        return OutputHead(model)
    if model not in _HEAD_CHECKED:
        head = None
        linear = model.get_output_embeddings()
        if model.base_model is not model and isinstance(linear, torch.nn.Linear):
            candidate = OutputHead(model)
            ids = sample[:1, : min(8, sample.shape[1])]
            rows = min(CHECKED_ROWS, candidate.vocab)
            cut = torch.nn.Linear(linear.in_features, rows, bias=linear.bias is not None, device="meta")
            cut.weight = torch.nn.Parameter(linear.weight[:rows], requires_grad=False)
            if linear.bias is not None:
                cut.bias = torch.nn.Parameter(linear.bias[:rows], requires_grad=False)
            model.set_output_embeddings(cut)
            try:
                try:
                    reference = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[0, -1]
                except TypeError:
                    reference = model(input_ids=ids, use_cache=False).logits[0, -1]
            finally:
                model.set_output_embeddings(linear)
            hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state[0, -1:]
            mine = candidate.logits(hidden, linear.weight[:rows])[0].float()
            reference = reference.float()
            tolerance = 1e-4 * float(reference.abs().max()) + 1e-5
            same = reference.shape == mine.shape and torch.allclose(
                mine, reference, rtol=1e-3, atol=tolerance
            )
            head = candidate if same else None
        _HEAD_CHECKED[model] = head
    return _HEAD_CHECKED[model]


@contextmanager
def _observing(
    layers: torch.nn.ModuleList, observer: LayerObserver | None
) -> Iterator[Callable[[Batch], None]]:
    """While inside, `observer` sees each layer's output at the scored positions of the batch last
    announced with the yielded function (which also calls `observer.begin`)."""
    current: list[Batch] = []

    def on_layer(index: int, output: torch.Tensor) -> None:
        assert observer is not None
        observer.layer(index, output[current[0].scored.to(output.device)])

    def announce(batch: Batch) -> None:
        current[:] = [batch]
        if observer is not None:
            observer.begin(batch)

    with output_hooks(layers, on_layer) if observer else nullcontext():
        yield announce


def _final_states_in_memory(
    model: PreTrainedModel, work: list[Batch], observer: LayerObserver | None, keep: bool
) -> list[torch.Tensor]:
    """Per batch: the base model's output at the predicting positions (after the final norm)."""
    device = next(model.parameters()).device
    states = []
    with _observing(decoder_layers(model), observer) as announce:
        for batch in work:
            announce(batch)
            hidden = model.base_model(input_ids=batch.input_ids.to(device), use_cache=False).last_hidden_state
            if keep:
                states.append(hidden[batch.predicting.to(device)])
    return states


def _final_states_streamed(
    source: StreamedModel, work: list[Batch], observer: LayerObserver | None, keep: bool
) -> list[torch.Tensor]:
    """The same states, one decoder layer at a time over every batch (the layer read from its
    shards, run, released); observers see each (layer, batch) after `begin(batch)`."""
    model = source.model
    layers = decoder_layers(model)
    calls = capture_layer_calls(model, [batch.input_ids for batch in work], source.device, source.offload)
    with _observing(layers, observer) as announce:
        for index, layer in enumerate(layers):
            source.materialize(layer)
            for position, (batch, hidden) in enumerate(zip(work, calls.hidden, strict=True)):
                announce(batch)
                kwargs = move(calls.kwargs_for(index, hidden), source.device, {})
                calls.hidden[position] = layer_output(layer(hidden, **kwargs))
            source.release(layer)
    states = []
    if keep:
        norm = getattr(model.base_model, "norm", None)
        if norm is None:
            raise CpsError(f"cannot stream {type(model).__name__}: its base model has no final `norm`")
        for batch, hidden in zip(work, calls.hidden, strict=True):
            states.append(norm(hidden)[batch.predicting.to(hidden.device)])
    calls.hidden.close()
    return states


class DeferredHead:
    """Decoder passes now, the LM head later: `add` runs the decoder over a list of windows (its
    observer sees every layer) and keeps the final states at the predicting positions; `nlls` then
    runs the head once over the states of everything added, so its weights are read once however
    many texts (languages) there are. A head cps cannot reproduce is replaced by the model's own
    full logits, batch by batch, in `add`."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self.source = streamed(model)
        self.device = self.source.device if self.source is not None else next(model.parameters()).device
        self.added: list[tuple[list[Batch], list[torch.Tensor] | None, torch.Tensor]] = []

    @torch.inference_mode()
    def add(self, windows: list[Window], observer: LayerObserver | None = None) -> None:
        work = batches(windows, BATCH_TOKENS)
        nll = torch.zeros(len(windows), dtype=torch.float64)
        if checked_head(self.model, work[0].input_ids.to(self.device)) is None:
            self.added.append((work, None, _score_full_logits(self.model, work, observer, nll)))
            return
        states = final_states(self.model, work, observer, keep=True)
        self.added.append((work, states, nll))

    @torch.inference_mode()
    def nlls(self) -> list[torch.Tensor]:
        """Per `add`: the summed NLL of each window's scored tokens (float64, in window order)."""
        pending = [(work, states) for work, states, _ in self.added if states is not None]
        if pending:
            head = checked_head(self.model, pending[0][0][0].input_ids.to(self.device))
            assert head is not None
            targets = torch.cat([b.input_ids[b.scored] for work, _ in pending for b in work]).to(self.device)
            token_nll = (
                head.nll(torch.cat([s for _, states in pending for s in states]), targets).double().cpu()
            )
            offset = 0
            for work, states, nll in self.added:
                if states is None:
                    continue
                for batch in work:
                    count = int(batch.scored.sum())
                    per_row = torch.zeros(len(batch.rows), dtype=torch.float64)
                    per_row.index_add_(0, batch.scored.nonzero()[:, 0], token_nll[offset : offset + count])
                    nll[batch.rows] = per_row
                    offset += count
        return [nll for _, _, nll in self.added]


def final_states(
    model: PreTrainedModel, work: list[Batch], observer: LayerObserver | None, keep: bool
) -> list[torch.Tensor]:
    """Per batch: the base model's output at the predicting positions (after the final norm), in
    memory or streamed; with `keep=False` only the observer's pass (nothing returned)."""
    source = streamed(model)
    if source is not None:
        return _final_states_streamed(source, work, observer, keep)
    return _final_states_in_memory(model, work, observer, keep)


@torch.inference_mode()
def score_windows(
    model: PreTrainedModel,
    windows: list[Window],
    observer: LayerObserver | None = None,
    head: bool = True,
) -> torch.Tensor:
    """Summed NLL of each window's scored tokens (float64, in window order); with `head=False` only
    the decoder runs (for observers) and the NLLs are zero. The LM head runs once, after the
    decoder, over the predicting positions of every batch."""
    if not head:
        final_states(model, batches(windows, BATCH_TOKENS), observer, keep=False)
        return torch.zeros(len(windows), dtype=torch.float64)
    deferred = DeferredHead(model)
    deferred.add(windows, observer)
    return deferred.nlls()[0]


def _score_full_logits(
    model: PreTrainedModel, work: list[Batch], observer: LayerObserver | None, nll: torch.Tensor
) -> torch.Tensor:
    """Exact for any in-memory model: its own forward's full logits, batch by batch."""
    device = next(model.parameters()).device
    with _observing(decoder_layers(model), observer) as announce:
        for batch in work:
            announce(batch)
            logits = model(input_ids=batch.input_ids.to(device), use_cache=False).logits
            targets = batch.input_ids[batch.scored].to(device)
            token_nll = torch.nn.functional.cross_entropy(
                logits[batch.predicting.to(device)].float(), targets, reduction="none"
            )
            per_row = torch.zeros(len(batch.rows), dtype=torch.float64)
            per_row.index_add_(0, batch.scored.nonzero()[:, 0], token_nll.double().cpu())
            nll[batch.rows] = per_row
    return nll


def score_text(
    model: PreTrainedModel, text: HeldOutText, observer: LayerObserver | None = None
) -> PerplexityResult:
    """Per-document NLL, tokens and bytes of held-out text already cut into windows."""
    return text_result(text, score_windows(model, text.windows, observer))


def text_result(text: HeldOutText, per_window: torch.Tensor) -> PerplexityResult:
    """Per-document NLL, tokens and bytes from the NLL of each of the text's windows."""
    per_document = [0.0] * len(text.documents)
    for window, value in zip(text.windows, per_window.tolist(), strict=True):
        per_document[window.document] += value
    return PerplexityResult([d.id for d in text.documents], per_document, text.tokens, text.bytes)


def perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    documents: list[Document],
    seqlen: int = 1024,
    stride: int | None = None,
) -> PerplexityResult:
    return score_text(model, held_out_windows(documents, tokenizer, seqlen, stride))
