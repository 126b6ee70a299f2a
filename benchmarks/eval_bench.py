"""Perplexity under cps's protocol vs a bare Hugging Face loop, the cost of the held-out SNR, and
what the protocol changed.

1. Throughput: cps (`score_text`: windows batched by length, LM head on the scored positions in
   chunks) against a bare loop running `model(input_ids, labels=...)` window by window on exactly
   the same windows (FLORES dev+test of the chosen languages). Same process, side by side.
2. Held-out SNR: the same cps pass with the SNR meter against recorded dense states, as a ratio to
   the plain pass (the SNR needs no extra forward pass).
3. Protocol 1 (cps <= 0.1: all documents one token stream cut into pieces of seqlen - 1, BOS only
   before the first) against protocol 2 (each document alone, BOS first in every window), on the
   first `--protocol-docs` documents.

    .venv/bin/python benchmarks/eval_bench.py [--langs en,sw --seqlen 1024 --protocol-docs 20]

Target: cps throughput >= 0.9 x the bare loop.
"""

from __future__ import annotations

import argparse
import math
import time

import torch


def bare_loop(model, windows) -> float:
    total = 0.0
    with torch.inference_mode():
        for window in windows:
            ids = window.input_ids[None]
            labels = ids.clone()
            labels[:, : ids.shape[1] - window.scored] = -100
            total += model(input_ids=ids, labels=labels).loss.item() * window.scored
    return total


def protocol_1_ppl(model, tokenizer, documents, seqlen: int) -> float:
    """Perplexity as cps scored it before the per-document protocol (kept here for comparison)."""
    separator = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    stream: list[int] = []
    for index, document in enumerate(documents):
        stream += tokenizer(document.text, add_special_tokens=False)["input_ids"]
        stream += separator if index < len(documents) - 1 else []
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(stream), seqlen - 1):
            context = [tokenizer.bos_token_id] if start == 0 else [stream[start - 1]]
            ids = torch.tensor([context + stream[start : start + seqlen - 1]])
            total += model(ids, labels=ids).loss.item() * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    return math.exp(total / count)


def main() -> None:
    from cps.data import get_corpus
    from cps.evaluation.hidden import PositionSample, SnrMeter, StateRecorder
    from cps.evaluation.perplexity import perplexity, score_text, score_windows
    from cps.evaluation.windows import held_out_windows
    from cps.models import decoder_layers, load_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--langs", default="en,sw")
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--protocol-langs", default="en,sw,zh")
    parser.add_argument("--protocol-docs", type=int, default=20)
    parser.add_argument("--protocol-seqlen", type=int, default=512)
    args = parser.parse_args()
    loaded = load_model(args.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    corpus = get_corpus("flores")
    cps_time = bare_time = snr_time = 0.0
    tokens = 0
    for lang in args.langs.split(","):
        text = held_out_windows(corpus.documents(lang), tokenizer, args.seqlen)
        bare_loop(model, text.windows[:1])  # warm-up
        started = time.perf_counter()
        result = score_text(model, text)
        cps_time += time.perf_counter() - started
        started = time.perf_counter()
        nll = bare_loop(model, text.windows)
        bare_time += time.perf_counter() - started
        sample = PositionSample.of(text)
        recorder = StateRecorder(sample, len(decoder_layers(model)))
        score_windows(model, text.windows, recorder, head=False)
        started = time.perf_counter()
        score_text(model, text, SnrMeter(sample, recorder.states))
        snr_time += time.perf_counter() - started
        tokens += result.total_tokens
        bare_ppl = math.exp(nll / result.total_tokens)
        print(f"{lang}: {result.total_tokens} tokens, ppl {result.ppl:.3f} (bare loop {bare_ppl:.3f})")
    print(f"cps  {tokens / cps_time:8.1f} tokens/s")
    print(f"bare {tokens / bare_time:8.1f} tokens/s")
    print(f"ratio {bare_time / cps_time:.3f} (target >= 0.9)")
    print(f"with the held-out SNR meter: {snr_time / cps_time:.3f}x the time of the plain cps pass")
    print(f"protocol 1 -> 2, first {args.protocol_docs} FLORES documents, seqlen {args.protocol_seqlen}:")
    for lang in args.protocol_langs.split(","):
        documents = corpus.documents(lang)[: args.protocol_docs]
        old = protocol_1_ppl(model, tokenizer, documents, args.protocol_seqlen)
        new = perplexity(model, tokenizer, documents, args.protocol_seqlen).ppl
        print(f"  {lang}: {old:.1f} -> {new:.1f}")


if __name__ == "__main__":
    main()
