"""Perplexity throughput of gemma3-270m through cps vs a bare Hugging Face forward loop.

Both score the same tokens (the FLORES dev+test text of the chosen languages, cut as cps cuts it)
in the same process; the bare loop runs `model(input_ids, labels=input_ids)` chunk by chunk.

    .venv/bin/python benchmarks/eval_bench.py [--langs en,sw --seqlen 1024]

Target: cps throughput >= 0.9 x the bare loop.
"""

from __future__ import annotations

import argparse
import time

import torch


def bare_loop(model, chunks: list[torch.Tensor]) -> float:
    total = 0.0
    with torch.inference_mode():
        for chunk in chunks:
            ids = chunk[None]
            total += model(input_ids=ids, labels=ids).loss.item() * (len(chunk) - 1)
    return total


def main() -> None:
    from cps.data import get_corpus
    from cps.data.calibration import token_stream
    from cps.evaluation.perplexity import perplexity, score_chunks
    from cps.models import load_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--langs", default="en,sw")
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.add_argument("--model", default="gemma3-270m")
    args = parser.parse_args()
    loaded = load_model(args.model)
    corpus = get_corpus("flores")
    cps_time = bare_time = 0.0
    tokens = 0
    for lang in args.langs.split(","):
        documents = corpus.documents(lang)
        stream, _ = token_stream(documents, loaded.tokenizer)
        chunks = score_chunks(stream, args.seqlen, loaded.tokenizer.bos_token_id)
        bare_loop(loaded.model, chunks[:1])  # warm-up
        started = time.perf_counter()
        result = perplexity(loaded.model, loaded.tokenizer, documents, args.seqlen)
        cps_time += time.perf_counter() - started
        started = time.perf_counter()
        nll = bare_loop(loaded.model, chunks)
        bare_time += time.perf_counter() - started
        tokens += result.tokens
        bare_ppl = torch.tensor(nll / result.tokens).exp().item()
        print(f"{lang}: {result.tokens} tokens, ppl {result.ppl:.3f} (bare loop {bare_ppl:.3f})")
    print(f"cps  {tokens / cps_time:8.1f} tokens/s")
    print(f"bare {tokens / bare_time:8.1f} tokens/s")
    print(f"ratio {bare_time / cps_time:.3f} (target >= 0.9)")


if __name__ == "__main__":
    main()
