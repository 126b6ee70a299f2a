"""lm-eval's HF wrapper with cps's loglikelihood: a context shared by several continuations runs once.

lm-eval's `HFLM` scores a multiple-choice item as one row per choice, context + choice, and takes
the log-softmax over the whole [batch, length, vocab] logits (Gemma-3: 262k entries). Every
loglikelihood request of lm-eval goes through `_loglikelihood_tokens`, which `SharedContextLM`
replaces, for the same scores:

- Each request keeps lm-eval's input: context + continuation, left-truncated to `max_length` + 1
  tokens. Requests are grouped by their (truncated) context tokens, a row holding up to 512
  tokens of them (one request alone may fill `max_length`).
- A group is one packed row: its context once, then every continuation but its last token. Each
  continuation sits at the positions it would have right after the context (position ids) and sees
  the context and itself only (a 4D attention mask; a sliding-window layer's mask also keeps to
  its window). The context's last state predicts the first token of every continuation.
- Rows are sorted by length and batched up to `batch_size` x 512 tokens (padding under 15%).
- The LM head and its log-softmax run at the predicting positions only, each position once (the
  context's last state predicts the first token of every continuation), over the vocabulary in
  chunks (`OutputHead`): the continuation's summed log-probability, and whether each of its tokens
  was the argmax (lm-eval's `is_greedy`). No [batch, length, vocab] tensor is ever built.

Before packing on a model it scores its first batch both packed and as plain rows (one per request,
a padding mask, default positions), and packs only if the two agree: an architecture that ignores
position ids or custom masks is scored as plain rows. Requests it cannot place (an empty context, a
continuation longer than `max_length`), a head cps cannot reproduce and seq2seq models take
`HFLM`'s own path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

from cps.evaluation.perplexity import OutputHead, checked_head
from cps.evaluation.windows import length_groups

log = logging.getLogger(__name__)

ROW_TOKENS = 512  # tokens per forward: batch_size x ROW_TOKENS (activations ~50 KB a token on Gemma-3 270M)
_PACKS: dict[tuple, bool] = {}  # packing_key(model) -> packed rows agree with plain ones?


def packing_key(model: torch.nn.Module) -> tuple:
    """What decides whether packed rows score as plain ones: the architecture's code, its config
    (attention implementation, sliding windows), dtype and device, never the weight values: a
    sweep's pruned models share the dense model's check."""
    config = model.config
    return (
        type(model).__qualname__,
        config.to_json_string(use_diff=False),
        getattr(config, "_attn_implementation", None),
        str(next(model.parameters()).dtype),
        next(model.parameters()).device.type,
    )


@dataclass
class Row:
    """One forward row: a context and the continuations scored after it."""

    context: list[int]
    requests: list[tuple[int, list[int]]] = field(default_factory=list)  # (request index, tokens)

    def __len__(self) -> int:
        return len(self.context) + sum(len(tokens) - 1 for _, tokens in self.requests)


def rows_of(
    requests: list[tuple[Any, list[int], list[int]]], max_length: int, pack: bool, cap: int = ROW_TOKENS
) -> list[Row]:
    """lm-eval's token requests as forward rows: per distinct context one row (more rows where its
    continuations need them) when packing, else one row per request. A packed row takes further
    continuations up to `cap` tokens only: its attention costs the square of its length, whatever
    the mask keeps (unconditional requests all share the context [BOS]; with Gemma-3's 32k
    `max_length`, 100 next-sentence items in 7 languages would be one 140k-token row). A single
    request fills a row up to `max_length`. Requests a row cannot hold are left out (the caller
    scores them otherwise)."""
    rows: list[Row] = []
    open_rows: dict[tuple[int, ...], Row] = {}
    for index, (_, context, continuation) in enumerate(requests):
        if not continuation or len(continuation) > max_length:
            continue
        whole = (context + continuation)[-(max_length + 1) :]  # lm-eval's truncation
        kept = whole[: len(whole) - len(continuation)]
        if not kept:
            continue
        row = open_rows.get(tuple(kept)) if pack else None
        if row is None or len(row) + len(continuation) - 1 > min(max_length, cap):
            row = Row(kept)
            rows.append(row)
            open_rows[tuple(kept)] = row
        row.requests.append((index, continuation))
    return rows


@dataclass
class Forward:
    """A batch of rows laid out for one forward pass."""

    input_ids: torch.Tensor  # [b, L], right-padded with 0
    position_ids: torch.Tensor  # [b, L]
    segments: torch.Tensor  # [b, L]: -1 context, j continuation j of the row, -2 padding
    reads: list[tuple[int, list[int], list[int]]]  # (request, flat positions predicting, targets)

    @classmethod
    def of(cls, rows: list[Row]) -> Forward:
        width = max(len(row) for row in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        positions = torch.zeros(len(rows), width, dtype=torch.long)
        segments = torch.full((len(rows), width), -2, dtype=torch.long)
        reads = []
        for r, row in enumerate(rows):
            length = len(row.context)
            ids[r, :length] = torch.tensor(row.context)
            positions[r, :length] = torch.arange(length)
            segments[r, :length] = -1
            start = length
            for j, (request, tokens) in enumerate(row.requests):
                inputs = tokens[:-1]
                stop = start + len(inputs)
                ids[r, start:stop] = torch.tensor(inputs, dtype=torch.long)
                positions[r, start:stop] = torch.arange(length, length + len(inputs))
                segments[r, start:stop] = j
                predicting = [length - 1, *range(start, stop)]
                reads.append((request, [r * width + p for p in predicting], tokens))
                start = stop
        return cls(ids, positions, segments, reads)

    def mask(self, window: int | None = None) -> torch.Tensor:
        """[b, 1, L, L], True where a query may attend: earlier positions of the context and of its
        own continuation (padding sees padding), within `window` positions when given."""
        pos_q, pos_k = self.position_ids[:, :, None], self.position_ids[:, None, :]
        seg_q, seg_k = self.segments[:, :, None], self.segments[:, None, :]
        allowed = (pos_k <= pos_q) & ((seg_k == seg_q) | ((seg_k == -1) & (seg_q >= 0)))
        if window is not None:
            allowed &= pos_q - pos_k < window
        return allowed[:, None]


def attention_masks(model: Any, forward: Forward) -> torch.Tensor | dict[str, torch.Tensor] | None:
    """The packed rows' masks as the model's attention takes them (boolean for SDPA, additive for
    eager): one 4D mask, or one per layer type for models that mix sliding-window and full layers;
    None when cps cannot hand it such a mask (another attention kernel, a model-wide sliding window)."""
    config = model.config.get_text_config()
    kernel = getattr(config, "_attn_implementation", None)
    if kernel not in ("sdpa", "eager"):
        return None

    def as_taken(allowed: torch.Tensor) -> torch.Tensor:
        if kernel == "sdpa":
            return allowed
        additive = torch.zeros(allowed.shape, dtype=model.dtype)
        return additive.masked_fill_(~allowed, torch.finfo(model.dtype).min)

    layer_types = set(getattr(config, "layer_types", None) or ())
    window = getattr(config, "sliding_window", None)
    if "sliding_attention" in layer_types:
        if not layer_types <= {"sliding_attention", "full_attention"}:
            return None
        return {
            kind: as_taken(forward.mask(window if kind == "sliding_attention" else None))
            for kind in layer_types
        }
    if window is not None and getattr(config, "use_sliding_window", True):
        return None  # a sliding window set model-wide: its mask builder would drop ours
    return as_taken(forward.mask())


class SharedContextLM(HFLM):
    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str], list[int], list[int]]],
        disable_tqdm: bool = False,
        override_bs: int | None = None,
    ) -> list[tuple[float, bool]]:
        if self.backend != "causal" or not requests:
            return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
        device = next(self.model.parameters()).device
        probe = torch.tensor([requests[0][1] + requests[0][2]], device=device)
        head = checked_head(self.model, probe)
        if head is None:
            return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        pack = self._packs(requests, head)
        rows = rows_of(requests, self.max_length, pack)
        budget = max(1, int(override_bs or self.batch_size or 1)) * ROW_TOKENS
        batches = [[rows[i] for i in group] for group in length_groups([len(row) for row in rows], budget)]
        total = sum(len(row.requests) for row in rows)
        with tqdm(total=total, disable=disable_tqdm, desc="loglikelihood (shared contexts)") as bar:
            answers = self._score(batches, head, pack, bar.update)
        for request, answer in answers.items():
            results[request] = answer
            self.cache_hook.add_partial("loglikelihood", requests[request][0], answer)
        rest = [i for i, answer in enumerate(results) if answer is None]
        if rest:  # requests no row could hold: lm-eval's own way
            for i, answer in zip(
                rest, super()._loglikelihood_tokens([requests[i] for i in rest], True), strict=True
            ):
                results[i] = answer
        return results  # type: ignore[return-value]

    def _packs(self, requests: list[Any], head: OutputHead) -> bool:
        """Whether this model scores packed rows as it scores plain ones (checked once per
        `packing_key`, on the first rows with a shared context)."""
        key = packing_key(self.model)
        if key in _PACKS:
            return _PACKS[key]
        packed = [row for row in rows_of(requests, self.max_length, True) if len(row.requests) > 1][:4]
        if not packed:
            return False  # nothing shared here: plain rows; the check waits for a later call
        if attention_masks(self.model, Forward.of(packed)) is None:
            _PACKS[key] = False
            return False
        chosen = {request for row in packed for request, _ in row.requests}
        plain = [row for row in rows_of(requests, self.max_length, False) if row.requests[0][0] in chosen]
        together, alone = self._score([packed], head, True), self._score([plain], head, False)
        tolerance = 1e-3 if self.model.dtype == torch.float32 else 5e-2
        agree = all(
            abs(together[r][0] - alone[r][0]) <= tolerance * max(1.0, abs(alone[r][0])) for r in chosen
        )
        if not agree:
            log.warning(
                "%s scores packed rows differently: each request runs alone", type(self.model).__name__
            )
        _PACKS[key] = agree
        return agree

    @torch.inference_mode()
    def _score(
        self, batches: list[list[Row]], head: OutputHead, pack: bool, done: Callable[[int], Any] | None = None
    ) -> dict[int, tuple[float, bool]]:
        """(log-likelihood, greedy) of every request in `batches` of rows: one decoder pass per batch,
        then the LM head once over the predicting states of them all (its weights read once)."""
        device = next(self.model.parameters()).device
        states, reads, targets, spans = [], [], [], []
        offset = 0
        for rows in batches:
            forward = Forward.of(rows)
            hidden = self._decoder(forward, pack, device)
            where = torch.tensor([p for _, positions, _ in forward.reads for p in positions], device=device)
            # a context's last position predicts every continuation's first token: its state once
            unique, inverse = torch.unique(where, return_inverse=True)
            states.append(hidden.reshape(-1, hidden.shape[-1])[unique])
            reads.append(inverse + offset)
            offset += len(unique)
            targets += [t for _, _, tokens in forward.reads for t in tokens]
            spans += [(request, len(tokens)) for request, _, tokens in forward.reads]
            if done is not None:
                done(sum(len(row.requests) for row in rows))
        wanted = torch.tensor(targets, device=device)
        nll, flags = head.scores(torch.cat(states), wanted, rows=torch.cat(reads))
        assert flags is not None
        nll_list, greedy = nll.double().cpu().tolist(), flags.cpu().tolist()
        answers, offset = {}, 0
        for request, count in spans:
            answers[request] = (-sum(nll_list[offset : offset + count]), all(greedy[offset : offset + count]))
            offset += count
        return answers

    def _decoder(self, forward: Forward, pack: bool, device: torch.device) -> torch.Tensor:
        """The base model's final states [b, L, d] of one batch: packed rows under their masks and
        position ids, or plain rows under a padding mask."""
        ids = forward.input_ids.to(device)
        if pack:
            masks = attention_masks(self.model, forward)
            assert masks is not None
            masks = (
                {k: v.to(device) for k, v in masks.items()} if isinstance(masks, dict) else masks.to(device)
            )
            kwargs = {"attention_mask": masks, "position_ids": forward.position_ids.to(device)}
        else:
            kwargs = {"attention_mask": (forward.segments != -2).long().to(device)}
        with torch.autocast(
            device_type=device.type,
            dtype=self.mixed_precision_dtype,
            enabled=self.mixed_precision_dtype is not None,
        ):
            return self.model.base_model(input_ids=ids, use_cache=False, **kwargs).last_hidden_state
