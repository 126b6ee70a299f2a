"""The CUDA path, checked in one run on the first GPU at hand (issue 14, part 4).

Prunes Gemma-3 270M with Wanda and SparseGPT in bf16 on the GPU — the model on the CPU, each
layer onloaded in turn (`cps prune --device cuda`), and streamed from the shards straight to the
GPU (`--stream`) — evaluates perplexity in two languages, and compares masks (IoU per linear,
averaged) and perplexities (relative difference) with the CPU fp32 run of the same settings.
Prints times and peak GPU memory, and a verdict: exit 1 when a CUDA run departs from the CPU fp32
run beyond the bounds (mask IoU below `--min-iou`, a perplexity further than `--max-ppl-diff`
from fp32's), 0 when every run is inside them. Without CUDA it says so and exits 2.

The default bounds are what bf16 rounding allows, not what a bug would leave: bf16 keeps 8
significant bits (relative rounding 2^-9 = 0.2%), so a Wanda score moves by at most ~0.4% and
only weights that close to the layer's threshold can change sides (well under 1% of them);
SparseGPT's column updates carry each flip into the later columns, so its masks drift further.
An IoU under 0.90 or a perplexity 3% off is no longer rounding: a wrong dtype, device or order.

    .venv/bin/python benchmarks/gpu_check.py [--nsamples 32 --seqlen 512 --docs 50 --langs en,sw]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch


def mask_iou(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    values = []
    for name in a:
        x, y = a[name].bool(), b[name].bool().to(a[name].device)
        union = (x | y).sum().item()
        values.append((x & y).sum().item() / union if union else 1.0)
    return sum(values) / len(values)


def departures(iou: float, ppl: dict, reference: dict, min_iou: float, max_ppl_diff: float) -> list[str]:
    """What lies beyond the bounds for one run against CPU fp32 (a NaN is beyond every bound)."""
    beyond = [] if iou >= min_iou else [f"IoU {iou:.4f} < {min_iou}"]
    for lang, value in ppl.items():
        rel = (value - reference[lang]) / reference[lang]
        if not abs(rel) <= max_ppl_diff:
            beyond.append(f"ppl {lang} {rel:+.2%} beyond ±{max_ppl_diff:.0%}")
    return beyond


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--docs", type=int, default=50)
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--langs", default="en,sw")
    parser.add_argument(
        "--device", default="cuda", help="cpu runs the same code paths (a dry run of this script)"
    )
    parser.add_argument("--min-iou", type=float, default=0.90, help="lowest mask IoU with CPU fp32")
    parser.add_argument(
        "--max-ppl-diff", type=float, default=0.03, help="largest relative perplexity difference"
    )
    args = parser.parse_args()
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device here: the GPU check did not run")
        return 2
    on_gpu = device.startswith("cuda")

    from cps.config import CalibrationConfig
    from cps.data import get_corpus
    from cps.data.calibration import build_calibration
    from cps.evaluation.perplexity import score_text
    from cps.evaluation.windows import held_out_windows
    from cps.models import LoadOptions, load_model, load_tokenizer, resolve_model, weights_folder
    from cps.pruning.base import get_method
    from cps.pruning.engine import EngineConfig, prune_model
    from cps.pruning.masks import SparsityTarget
    from cps.streaming import ShardWriter, WeightReader, open_streamed

    name = "gemma3-270m"
    gpu = torch.cuda.get_device_name(0) if on_gpu else "cpu (dry run)"
    print(f"device: {gpu}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    tokenizer = load_tokenizer(name)
    calib = build_calibration(CalibrationConfig(name, "sw", "ntrex", args.nsamples, args.seqlen), tokenizer)
    corpus = get_corpus("flores", None)
    langs = args.langs.split(",")
    texts = {
        lang: held_out_windows(corpus.documents(lang)[: args.docs], tokenizer, args.eval_seqlen)
        for lang in langs
    }
    target = SparsityTarget(0.5)
    work = Path(tempfile.mkdtemp(prefix="cps-gpu-check-"))

    def run(method: str, setting: str) -> tuple[dict, dict, float, float, float]:
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        if setting == "cpu fp32":
            model = load_model(name).model
            result = prune_model(model, calib.input_ids, get_method(method), target, EngineConfig("cpu"))
        elif setting == "cuda bf16 onload":
            model = load_model(name, LoadOptions("bfloat16", "cpu")).model
            result = prune_model(model, calib.input_ids, get_method(method), target, EngineConfig(device))
            model.to(device)
        else:  # streamed from the shards straight to the GPU
            folder = weights_folder(resolve_model(name))
            source = open_streamed(folder, torch.bfloat16, device)
            writer = ShardWriter(work / method)  # each pruned layer written as it is done
            result = prune_model(
                source.model,
                calib.input_ids,
                get_method(method),
                target,
                EngineConfig(device),
                lambda index, layer: writer.write(source.layer_state(layer)),
            )
            writer.close()
            scoring = open_streamed(folder, torch.bfloat16, device)  # dense shards, pruned layers over them
            scoring.overlay = WeightReader(work / method)
            model = scoring.model
        prune_s = time.perf_counter() - started
        started = time.perf_counter()
        ppl = {lang: score_text(model, text).ppl for lang, text in texts.items()}
        eval_s = time.perf_counter() - started
        peak = torch.cuda.max_memory_allocated() / 2**30 if on_gpu else float("nan")
        return result.masks, ppl, prune_s, eval_s, peak

    print(f"gemma3-270m, 50% unstructured, {args.nsamples} x {args.seqlen} sw NTREX tokens;")
    documents = f"the first {args.docs} FLORES documents of {', '.join(langs)}"
    print(f"perplexity on {documents} at seqlen {args.eval_seqlen}")
    header = (
        f"{'method':<10} {'setting':<18} {'prune s':>8} {'eval s':>7} {'peak GPU GiB':>12} {'IoU vs CPU':>10}"
    )
    print(header + "".join(f" {'ppl ' + lang:>10} {'rel diff':>9}" for lang in langs) + "  verdict")
    failed = []
    for method in ("wanda", "sparsegpt"):
        reference = None
        for setting in ("cpu fp32", "cuda bf16 onload", "cuda bf16 stream"):
            masks, ppl, prune_s, eval_s, peak = run(method, setting)
            if reference is None:
                reference = (masks, ppl)
            iou = mask_iou(reference[0], masks)
            line = f"{method:<10} {setting:<18} {prune_s:>8.1f} {eval_s:>7.1f} {peak:>12.2f} {iou:>10.4f}"
            for lang in langs:
                rel = (ppl[lang] - reference[1][lang]) / reference[1][lang]
                line += f" {ppl[lang]:>10.3f} {rel:>+9.2%}"
            beyond = departures(iou, ppl, reference[1], args.min_iou, args.max_ppl_diff)
            print(line + ("  ok" if not beyond else "  BEYOND: " + "; ".join(beyond)), flush=True)
            failed += [f"{method} {setting}: {what}" for what in beyond]
    if failed:
        print(f"FAILED: {len(failed)} departure(s) from CPU fp32 beyond the bounds:")
        print("\n".join(f"  {what}" for what in failed))
        return 1
    print(f"PASSED: every CUDA run within IoU >= {args.min_iou} and ±{args.max_ppl_diff:.0%} perplexity")
    return 0


if __name__ == "__main__":
    sys.exit(main())
