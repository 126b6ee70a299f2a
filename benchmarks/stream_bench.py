"""Layer streaming: peak memory and time of `cps prune` and `cps eval`'s perplexity, streamed from
the shards against the whole model in memory (issue 14).

Each measurement runs in a fresh process (peak RSS is the whole process's high-water mark):

- baseline: importing torch, transformers and mlflow (and cps) alone; and with Gemma-3's tokenizer
  loaded, which a run needs only while its text is not cached yet (a first run, then `warm` caches
  the calibration set and the held-out windows, as any first run does);
- prune: Gemma-3 270M fp32 pruned with Wanda on 32 x 512 Swahili NTREX tokens, in memory and
  streamed (load + prune, wall time; masks compared);
- eval: perplexity of the dense Gemma-3 270M on the first `--docs` FLORES documents per language
  at `--seqlen`, in memory and streamed (load + score; NLL compared bit for bit).

Prints the figures, the ratio streamed / in memory, and the peak-memory formula with what it
predicts for Llama-3-70B (bf16, 128 x 2048 calibration windows).

    .venv/bin/python benchmarks/stream_bench.py [--nsamples 32 --seqlen 512 --docs 20 --langs en,sw]
    .venv/bin/python benchmarks/stream_bench.py --method gptq --prune-only     (issue 27: GPTQ streamed)

Targets: streamed prune peak RSS <= 0.75 GB, streamed perplexity <= 0.85 GB, each <= 1.15x the
in-memory time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def baseline() -> dict:
    import cps  # first, as in `cps ...`: its allocator setting must precede torch's first tensor

    # isort: split
    import mlflow  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import cps.stages.prune  # noqa: F401

    return {"peak_rss_gb": rss_gb()}


def tokenizer_floor() -> dict:
    """The imports plus loading Gemma-3's tokenizer (262k entries), as a run whose text is not cached does."""
    baseline()
    from cps.models import load_tokenizer

    load_tokenizer("gemma3-270m")
    return {"peak_rss_gb": rss_gb()}


def _calibration(nsamples: int, seqlen: int):
    """The calibration set as `cps prune` gets it: from the cache when the tokenizer's fingerprint
    is known, else tokenized (and cached)."""
    from cps.config import CalibrationConfig
    from cps.data.calibration import build_calibration
    from cps.stages.calibrate import tokenizer_or_fingerprint

    config = CalibrationConfig("gemma3-270m", "sw", "ntrex", nsamples, seqlen)
    return build_calibration(config, *tokenizer_or_fingerprint("gemma3-270m"))


def _windows(langs: list[str], docs: int, seqlen: int) -> dict:
    """The held-out windows as `cps eval` gets them (from the cache when windowed before)."""
    from cps.data import get_corpus
    from cps.evaluation.windows import cached_windows
    from cps.stages.calibrate import tokenizer_or_fingerprint

    corpus, (tokenizer, fingerprint) = get_corpus("flores", None), tokenizer_or_fingerprint("gemma3-270m")
    return {
        lang: cached_windows(corpus, lang, docs, tokenizer, seqlen, fingerprint=fingerprint)[0]
        for lang in langs
    }


def warm(args: argparse.Namespace) -> dict:
    """What a first run (or `cps calibrate`) leaves in the cache: the calibration set, the held-out
    windows and the tokenizer's fingerprint. The runs measured below then never load the tokenizer."""
    baseline()
    _calibration(args.nsamples, args.seqlen)
    _windows(args.langs.split(","), args.docs, args.eval_seqlen)
    return {"peak_rss_gb": rss_gb()}


def _model(mode: str):
    """Gemma-3 270M fp32 on the CPU: whole in memory, or its skeleton streamed from the shards."""
    import torch

    from cps.models import load_model, resolve_model, weights_folder
    from cps.streaming import open_streamed

    if mode == "stream":
        return open_streamed(weights_folder(resolve_model("gemma3-270m")), torch.float32, "cpu").model
    return load_model("gemma3-270m").model


def prune(mode: str, nsamples: int, seqlen: int, method: str = "wanda") -> dict:
    import hashlib

    baseline()  # what `cps prune` imports (mlflow included), so the figure is the command's

    from torch import nn

    from cps.pruning.base import MethodOptions, get_method
    from cps.pruning.engine import EngineConfig, prune_model
    from cps.pruning.masks import SparsityTarget

    calib = _calibration(nsamples, seqlen)  # cached by `warm`: the tokenizer is never loaded
    started = time.perf_counter()
    model = _model(mode)
    loaded_s = time.perf_counter() - started
    quantizes = method in ("gptq", "rtn")  # 4 bits, group 128: the weights are what to compare
    options = MethodOptions(bits=4) if quantizes else MethodOptions()
    target = SparsityTarget(0.0 if quantizes else 0.5)
    digest = hashlib.sha256()

    def on_layer(index: int, layer: nn.Module) -> None:  # each layer's new weights, before release
        if quantizes:
            for _, module in sorted(layer.named_modules(), key=lambda item: item[0]):
                if isinstance(module, nn.Linear):
                    digest.update(module.weight.detach().float().numpy().tobytes())

    result = prune_model(
        model, calib.input_ids, get_method(method, options), target, EngineConfig(), on_layer
    )
    for name in sorted(result.masks):
        digest.update(result.masks[name].numpy().tobytes())
    return {
        "load_s": loaded_s,
        "prune_s": result.seconds,
        "total_s": time.perf_counter() - started,
        "peak_rss_gb": rss_gb(),
        "masks": digest.hexdigest()[:16],
    }


def evaluate(mode: str, langs: list[str], docs: int, seqlen: int) -> dict:
    import hashlib

    baseline()  # what `cps eval` imports (mlflow included), so the figure is the command's

    from cps.evaluation.perplexity import score_text

    texts = _windows(langs, docs, seqlen)  # cached by `warm`: the tokenizer is never loaded
    started = time.perf_counter()
    model = _model(mode)
    results = {lang: score_text(model, text) for lang, text in texts.items()}
    digest = hashlib.sha256(json.dumps({lang: r.nll for lang, r in results.items()}).encode())
    return {
        "total_s": time.perf_counter() - started,
        "peak_rss_gb": rss_gb(),
        "ppl": {lang: r.ppl for lang, r in results.items()},
        "tokens": sum(r.total_tokens for r in results.values()),
        "nll": digest.hexdigest()[:16],
    }


def _child(args: argparse.Namespace, *extra: str) -> dict:
    command = [sys.executable, __file__, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen)]
    command += ["--docs", str(args.docs), "--eval-seqlen", str(args.eval_seqlen), "--langs", args.langs]
    command += ["--method", args.method]
    output = subprocess.run([*command, *extra], capture_output=True, text=True, check=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def predicted_peak_gb(
    layer_params: float,
    windows: int,
    seqlen: int,
    hidden: int,
    widths: list[int],
    largest_linear: float,
    dtype_bytes: int,
    layers: int,
    sampled: int | None = None,
) -> dict[str, float]:
    """peak = one layer's weights (run dtype)
    + every window's hidden states, into and out of the layer (run dtype, 2x)
    + the fp32 X^T X of each distinct input of the layer, plus one working copy of the
      widest (symmetrised; SparseGPT's Cholesky factor); for Wanda instead (`sampled` tokens for
      the error estimate) those tokens' fp32 rows of each distinct input
    + four fp32 copies of the largest linear (W, W', dW @ H, W @ H for error and signal)."""
    layer = layer_params * dtype_bytes
    activations = 2 * windows * seqlen * hidden * dtype_bytes
    if sampled is None:
        gram = sum(4 * width * width for width in widths) + 4 * max(widths) ** 2
    else:
        gram = sum(4 * sampled * width for width in widths)
    weight_work = 4 * 4 * largest_linear
    masks = layers * layer_params / 8
    total = layer + activations + gram + weight_work + masks
    return {
        "layer": layer / 1e9,
        "activations": activations / 1e9,
        "gram": gram / 1e9,
        "weight_work": weight_work / 1e9,
        "masks": masks / 1e9,
        "total": total / 1e9,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--docs", type=int, default=20)
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--langs", default="en,sw")
    parser.add_argument("--method", default="wanda", help="wanda | sparsegpt | gptq (4-bit g128) | rtn")
    parser.add_argument("--prune-only", action="store_true", help="skip the perplexity measurement")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        what, _, mode = args.one.partition(":")
        if what == "baseline":
            row = baseline()
        elif what == "tokenizer":
            row = tokenizer_floor()
        elif what == "warm":
            row = warm(args)
        elif what == "prune":
            row = prune(mode, args.nsamples, args.seqlen, args.method)
        else:
            row = evaluate(mode, args.langs.split(","), args.docs, args.eval_seqlen)
        print(json.dumps(row))
        return

    base = _child(args, "--one", "baseline")
    print(f"imports alone (torch, transformers, mlflow, cps): peak RSS {base['peak_rss_gb']:.2f} GB")
    floor = _child(args, "--one", "tokenizer")
    print(
        f"imports + loading Gemma-3's tokenizer (a run whose text is not cached yet): "
        f"peak RSS {floor['peak_rss_gb']:.2f} GB"
    )
    _child(args, "--one", "warm")  # calibration set and held-out windows cached, as after a first run
    what = f"{args.method} 4-bit g128" if args.method in ("gptq", "rtn") else f"{args.method} 50%"
    print(f"\nprune: gemma3-270m fp32, {what}, {args.nsamples} x {args.seqlen} sw NTREX tokens")
    rows = {mode: _child(args, "--one", f"prune:{mode}") for mode in ("memory", "stream")}
    for mode, row in rows.items():
        print(
            f"  {mode:<7} load {row['load_s']:5.1f} s  prune {row['prune_s']:6.1f} s  "
            f"total {row['total_s']:6.1f} s  peak RSS {row['peak_rss_gb']:.3f} GB  masks {row['masks']}"
        )
    _compare(rows, "masks", "masks (and quantized weights) identical", 0.75)
    if args.prune_only:
        return

    print(
        f"\nperplexity: dense gemma3-270m, first {args.docs} FLORES documents of {args.langs}, "
        f"seqlen {args.eval_seqlen}"
    )
    rows = {mode: _child(args, "--one", f"eval:{mode}") for mode in ("memory", "stream")}
    for mode, row in rows.items():
        ppl = ", ".join(f"{lang} {value:.2f}" for lang, value in row["ppl"].items())
        print(
            f"  {mode:<7} total {row['total_s']:6.1f} s  peak RSS {row['peak_rss_gb']:.3f} GB  "
            f"{row['tokens']} tokens  ppl {ppl}  nll {row['nll']}"
        )
    _compare(rows, "nll", "NLL bit-identical", 0.85)

    print(
        "\npeak memory of streamed pruning = layer + activations + statistics (SparseGPT: X^T X; "
        "Wanda: the error sample's rows) + weight work + masks:"
    )
    # Gemma-3 270M: hidden 640, 4 heads x 256 (o_proj reads 1024), MLP 2048; 5.6M weights a layer.
    sample = 512 + args.nsamples  # the engine's error sample: 512 tokens + every window's first
    gemma = predicted_peak_gb(
        5.6e6, args.nsamples, args.seqlen, 640, [640, 1024, 640, 2048], 2048 * 640, 4, 18, sample
    )
    print(f"  gemma3-270m fp32 Wanda, {args.nsamples} x {args.seqlen}: " + _parts(gemma) + " + the imports")
    # Llama-3-70B: hidden 8192, 64 heads / 8 KV heads x 128, MLP 28672; 855.7M weights a layer.
    for method, sampled in (("SparseGPT", None), ("Wanda", 512 + 128)):
        llama = predicted_peak_gb(
            855.7e6, 128, 2048, 8192, [8192, 8192, 8192, 28672], 28672 * 8192, 2, 80, sampled
        )
        print(f"  Llama-3-70B bf16 {method}, 128 x 2048: " + _parts(llama))
        offloaded = dict(llama, activations=2 * 4 * 2048 * 8192 * 2 / 1e9)  # one batch of 8192 tokens
        offloaded["total"] = sum(v for k, v in offloaded.items() if k != "total")
        print("  ... with --offload-activations (one 4 x 2048 batch in memory): " + _parts(offloaded))


def _compare(rows: dict[str, dict], digest: str, label: str, rss_target: float) -> None:
    ratio = rows["stream"]["total_s"] / rows["memory"]["total_s"]
    same = rows["stream"][digest] == rows["memory"][digest]
    print(f"  streamed / in memory: time {ratio:.2f}x (target <= 1.15), {label}: {same}")
    print(f"  streamed peak RSS {rows['stream']['peak_rss_gb']:.3f} GB (target <= {rss_target})")


def _parts(parts: dict[str, float]) -> str:
    named = ", ".join(f"{k} {v:.2f}" for k, v in parts.items() if k != "total")
    return f"{parts['total']:.2f} GB ({named})"


if __name__ == "__main__":
    main()
