"""lm-eval's HF wrapper, computing the LM head only where lm-eval reads the logits.

For a loglikelihood request lm-eval runs the model over context + continuation (right-padded to the
batch), takes the log-softmax over the whole [batch, length, vocab] logits, and then reads only the
continuation's positions. With a large vocabulary (Gemma-3: 262k) the head and that log-softmax
cost more than the decoder itself. `ContinuationLM` keeps the decoder pass as it is and asks the
model (`logits_to_keep`, a per-row mask) for the positions each row reads, returning a shorter logits
tensor laid out so that lm-eval's own slicing (`inplen + (logits_len - padding_len)`) lands on
them: the scores are those of `HFLM`, for a fraction of the work. Anything it does not recognise
(seq2seq, a row it cannot match to its request, a model without `logits_to_keep`) takes `HFLM`'s
own path.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from lm_eval.models.huggingface import HFLM
from transformers import modeling_utils


class ContinuationLM(HFLM):
    _spans: dict[tuple[int, ...], int] | None = None

    def _loglikelihood_tokens(
        self, requests: list[Any], *args: Any, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        # Per-row positions (a boolean logits_to_keep) came with transformers' slice_logits_to_keep.
        supported = "logits_to_keep" in inspect.signature(self.model.forward).parameters and hasattr(
            modeling_utils, "slice_logits_to_keep"
        )
        if self.backend != "causal" or not supported:
            return super()._loglikelihood_tokens(requests, *args, **kwargs)
        spans: dict[tuple[int, ...], int] = {}
        for _, context, continuation in requests:
            # Exactly lm-eval's causal input: the last max_length + 1 tokens, minus the last one.
            inp = tuple((context + continuation)[-(self.max_length + 1) :][:-1])
            spans[inp] = max(spans.get(inp, 0), len(continuation))
        self._spans = spans
        try:
            return super()._loglikelihood_tokens(requests, *args, **kwargs)
        finally:
            self._spans = None

    def _row_span(self, row: list[int]) -> tuple[int, int] | None:
        """(input length, continuation length) of a right-padded row, or None when unknown."""
        assert self._spans is not None
        length = len(row)
        while length > 0:
            contlen = self._spans.get(tuple(row[:length]))
            if contlen is not None:
                return length, contlen
            if row[length - 1] != 0:  # lm-eval pads with 0: a non-zero token is no padding
                return None
            length -= 1
        return None

    def _model_call(self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None, labels: Any = None):
        if self._spans is None or attn_mask is not None or labels is not None:
            return super()._model_call(inps, attn_mask, labels)
        spans = [self._row_span(row) for row in inps.tolist()]
        if any(span is None for span in spans):
            return super()._model_call(inps, attn_mask, labels)
        # Row i reads logits[inplen - contlen : inplen]: the head runs on those positions only.
        keep = torch.zeros(inps.shape, dtype=torch.bool, device=inps.device)
        for row, (inplen, contlen) in enumerate(spans):
            keep[row, inplen - contlen : inplen] = True
        offset = min(inplen - contlen for inplen, contlen in spans)
        with (
            torch.no_grad(),
            torch.autocast(
                device_type=self.device.type,
                dtype=self.mixed_precision_dtype,
                enabled=self.mixed_precision_dtype is not None,
            ),
        ):
            kept = self.model(inps, logits_to_keep=keep).logits
        kept = kept.reshape(-1, kept.shape[-1])  # [positions kept, vocab]
        # lm-eval slices row i at [inplen - contlen - offset, inplen - offset) when the returned
        # length is padding_len - offset; the positions nobody reads stay 0.
        logits = kept.new_zeros(inps.shape[0], inps.shape[1] - offset, kept.shape[-1])
        logits[:, : inps.shape[1] - offset][keep[:, offset:]] = kept
        return logits
