"""Evaluation speed and memory: perplexity under cps's protocol vs a bare Hugging Face loop, one demo
cell's evaluation against an earlier commit's, `cps eval`'s whole process, and import times.

Cases (`--cases`, all by default):

1. throughput: cps (`score_text`: windows batched by length, LM head on the scored positions in
   chunks) against a bare loop running `model(input_ids, labels=...)` window by window on exactly
   the same windows (FLORES dev+test of `--langs`), same process; the held-out SNR meter's cost as
   a ratio to the plain pass; protocol 1 (cps <= 0.1) against protocol 2 on a few documents.
   Target: cps throughput >= 0.9 x the bare loop.
2. demo-cell: what a `make demo` cell spends evaluating, this checkout against `--against` (the
   commit issue 15 started from), one fresh process each, one after the other on this machine:
   the first Wanda cell of studies/demo.toml is pruned (untimed) and its model evaluated in memory
   with the study's [eval] settings (perplexity and SNR in 7 languages, xcopa/sib/flores_next),
   twice: the first evaluation also pays the process's one-time costs (lm-eval's import, the
   dense states for the SNR), the second is a typical cell. `--profile DIR` writes a cProfile of
   each side's second evaluation. Target: new / old <= 0.55 (second evaluation).
3. process: `cps eval --model gemma3-270m` with the demo's settings as a user runs it, wall time
   and peak RSS of the whole process, each side. Target: peak <= 1.6 GB.
4. imports: seconds to import `cps.cli` and to run `cps --help` (the start of every command).
5. items: milliseconds per task item for SIB and next-sentence (`--sib-items`, `--next-items` per
   language of `--langs`) and their ratio to the FLOP floor of exact scoring (the decoder's
   linears over the distinct positions, the LM head over the scored ones, at the measured fp32
   matmul rate).

    .venv/bin/python benchmarks/eval_bench.py [--cases demo-cell,process --against 13a1eb5]

Memory is ru_maxrss / VmHWM in GiB, as cps's own peak_rss_gb.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from measure import ROOT, checkout, environment, peak_since_reset_gb, reset_peak, run_measured

STARTED_FROM = "13a1eb5"  # the commit issue 15 started from
DEMO = ROOT / "studies" / "demo.toml"


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


def throughput(args) -> None:
    from cps.data import get_corpus
    from cps.evaluation.hidden import PositionSample, SnrMeter, StateRecorder
    from cps.evaluation.perplexity import perplexity, score_text, score_windows
    from cps.evaluation.windows import held_out_windows
    from cps.models import decoder_layers, load_model

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


def demo_cell_child(profile: str | None) -> dict:
    """In a fresh process (run by `demo_cell`): prune the demo's first Wanda cell, then evaluate
    its model in memory twice as the sweep does. Uses only APIs both sides have."""
    import cps  # first, as in `cps ...`

    # isort: split
    import cProfile

    from cps.stages.evaluate import run_eval
    from cps.stages.prune import run_prune
    from cps.study import load_study
    from cps.tracking import Store

    study = load_study(DEMO)
    cell = next(c for c in study.cells if c.prune.method == "wanda")
    folder = tempfile.mkdtemp(prefix="cps-demo-cell-")
    store = Store(f"sqlite:///{folder}/db.sqlite", "bench")
    seconds, peaks = [], []
    work = {"decoder_tokens": 0, "head_rows": 0}  # of the second evaluation

    def then(run_id: str, loaded) -> None:
        model = loaded.model

        def count_tokens(module, args, kwargs) -> None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            work["decoder_tokens"] += 0 if ids is None else ids.numel()

        model.base_model.register_forward_pre_hook(count_tokens, with_kwargs=True)
        head = model.get_output_embeddings()  # the model's own head ran: the rows are not counted
        head.register_forward_pre_hook(lambda module, args: work.__setitem__("head_rows", -1))
        try:
            from cps.evaluation.perplexity import OutputHead
        except ImportError:
            OutputHead = None
        if OutputHead is not None and hasattr(OutputHead, "scores"):
            scores = OutputHead.scores

            def counted(self, states, *args, **kwargs):
                if work["head_rows"] >= 0:
                    work["head_rows"] += len(states)
                return scores(self, states, *args, **kwargs)

            OutputHead.scores = counted
        for attempt in range(2):
            for key in work:
                work[key] = 0
            profiler = cProfile.Profile() if profile and attempt == 1 else None
            reset_peak()
            started = time.perf_counter()
            if profiler:
                profiler.enable()
            run_eval(cell.evaluate, store, run_id, loaded)
            if profiler:
                profiler.disable()
                profiler.dump_stats(profile)
            seconds.append(time.perf_counter() - started)
            peaks.append(peak_since_reset_gb())

    run_prune(cell.prune, store, then=then)
    row = {"cps": cps.__file__, "cell": cell.label, "seconds": seconds, "peak_gb": peaks}
    return row | _compute_floor(work)


def _compute_floor(work: dict[str, int]) -> dict[str, float]:
    """What the second evaluation's linears alone cost at this machine's fp32 matmul rate: the
    decoder's over every token it ran, the LM head's over every position it scored (counted by
    wrapping `OutputHead.scores`: -1 where the model's own head ran instead, i.e. the old code)."""
    from cps.models import decoder_layers, load_model

    if work["head_rows"] < 0:
        return work
    model = load_model("gemma3-270m", tokenizer=False).model
    linears = [m for m in decoder_layers(model).modules() if isinstance(m, torch.nn.Linear)]
    layers = sum(m.weight.numel() for m in linears)
    vocab, width = model.get_output_embeddings().weight.shape
    states, weight = torch.randn(2048, width), torch.randn(4096, width)
    torch.nn.functional.linear(states, weight)
    started = time.perf_counter()
    for _ in range(10):
        torch.nn.functional.linear(states, weight)
    rate = 10 * 2 * states.shape[0] * weight.numel() / (time.perf_counter() - started)
    flops = 2 * layers * work["decoder_tokens"] + 2 * vocab * width * max(work["head_rows"], 0)
    return {**work, "matmul_gflops": rate / 1e9, "floor_s": flops / rate}


def matmul_rate(width: int) -> float:
    """This machine's fp32 matmul rate (FLOP/s) on the LM head's shape: 2048 states x 4096 rows."""
    states, weight = torch.randn(2048, width), torch.randn(4096, width)
    torch.nn.functional.linear(states, weight)
    started = time.perf_counter()
    for _ in range(10):
        torch.nn.functional.linear(states, weight)
    return 10 * 2 * states.shape[0] * weight.numel() / (time.perf_counter() - started)


def items(args, sides: dict[str, Path]) -> None:
    """Milliseconds per task item for SIB and next-sentence (flores_next) against the FLOP floor of
    exact scoring: the decoder's linears over the items' distinct positions (each context once,
    every choice; each choice alone again for acc_mutual_info) and the LM head over the scored
    positions (every choice token), at this machine's measured fp32 matmul rate. Attention's own
    FLOPs (short contexts here) are left out of the floor, so the ratio is an upper bound."""
    from cps.evaluation.tasks import run_tasks
    from cps.models import decoder_layers, load_model
    from cps.stages.estimate import task_work

    loaded = load_model(args.model)
    model = loaded.model
    linears = [m for m in decoder_layers(model).modules() if isinstance(m, torch.nn.Linear)]
    layers = sum(m.weight.numel() for m in linears)
    vocab, width = model.get_output_embeddings().weight.shape
    langs = args.langs.split(",")
    run_tasks(model, loaded.tokenizer, [f"sib_{langs[0]}"], limit=2)  # lm-eval's import and set-up
    rate = matmul_rate(width)
    print(f"items: {args.model}, fp32 matmul {rate / 1e9:.0f} GFLOP/s, {torch.get_num_threads()} threads")
    for family, count in (("sib", args.sib_items), ("flores_next", args.next_items)):
        names = [f"{family}_{lang}" for lang in langs]
        limits = dict.fromkeys(names, float(count))
        work = task_work(names, None, loaded.tokenizer, limits)
        started = time.perf_counter()
        run_tasks(model, loaded.tokenizer, names, limits=limits)
        seconds = time.perf_counter() - started
        done = sum(w.items for w in work.values())
        positions = sum(w.positions for w in work.values())
        scored = sum(w.scored for w in work.values())
        floor = (2 * layers * positions + 2 * vocab * width * scored) / rate
        print(
            f"  {family}: {done} items ({', '.join(langs)}), {1e3 * seconds / done:.1f} ms an item; "
            f"floor {1e3 * floor / done:.1f} ms ({positions / done:.0f} positions, {scored / done:.0f} "
            f"scored, an item); measured / floor = {seconds / floor:.2f}"
        )


def demo_cell(args, sides: dict[str, Path]) -> None:
    print("one demo cell's evaluation (studies/demo.toml [eval]), in memory, after pruning it:")
    rows = {}
    for side, source in sides.items():
        command = [sys.executable, __file__, "--demo-cell-child"]
        if args.profile:
            Path(args.profile).mkdir(parents=True, exist_ok=True)
            command += ["--profile", str(Path(args.profile) / f"demo_cell_{side}.pstats")]
        cache = Path(tempfile.mkdtemp(prefix=f"cps-cache-{side}-"))
        run = run_measured(command, environment(source, cache))
        if run.returncode != 0:
            raise SystemExit(f"{side}: the demo cell failed:\n{run.output[-3000:]}")
        rows[side] = json.loads(run.output.strip().splitlines()[-1])
        first, second = rows[side]["seconds"]
        print(
            f"  {side:<5} ({rows[side]['cps']}): first {first:6.1f} s, second {second:6.1f} s, "
            f"peak while evaluating {max(rows[side]['peak_gb']):.2f} GB"
        )
        if rows[side]["head_rows"] >= 0:
            print(
                f"        second evaluation: {rows[side]['decoder_tokens']} decoder tokens, "
                f"{rows[side]['head_rows']} positions through the LM head; their linears alone at "
                f"this machine's fp32 matmul rate ({rows[side]['matmul_gflops']:.0f} GFLOP/s): "
                f"{rows[side]['floor_s']:.1f} s"
            )
    if len(rows) == 2:
        ratio = rows["new"]["seconds"][1] / rows["old"]["seconds"][1]
        first = rows["new"]["seconds"][0] / rows["old"]["seconds"][0]
        print(f"  new / old: {ratio:.3f} (second evaluation; target <= 0.55), first evaluation {first:.3f}")
        if rows["new"]["head_rows"] >= 0:
            floor = rows["new"]["floor_s"] / rows["old"]["seconds"][1]
            print(f"  the new side's linears alone would be {floor:.3f} of the old side's evaluation")
    if args.profile:
        print(f"  profiles: {args.profile}/demo_cell_<side>.pstats (python -m pstats)")


def process(args, sides: dict[str, Path]) -> None:
    print("cps eval --model gemma3-270m with the demo's [eval] settings, the whole process:")
    limits = ["--task-limit", "xcopa=10", "--task-limit", "sib=2", "--task-limit", "flores_next=1"]
    for side, source in sides.items():
        folder = tempfile.mkdtemp(prefix="cps-eval-process-")
        command = [
            sys.executable, "-m", "cps", "eval", "--model", "gemma3-270m",
            "--tasks", "xcopa,sib,flores_next", *limits, "--seqlen", "512", "--max-docs", "6",
            "--tracking-uri", f"sqlite:///{folder}/db.sqlite",
        ]  # fmt: skip
        # (not from the checkout's folder: `-m cps` would import the cps found there first)
        run = run_measured(command, environment(source, Path(folder) / "cache"), cwd=folder)
        if run.returncode != 0:
            raise SystemExit(f"{side}: cps eval failed:\n{run.output[-3000:]}")
        target = " (target <= 1.6 GB)" if side == "new" else ""
        print(f"  {side:<5} {run.seconds:6.1f} s, peak RSS {run.peak_gb:.2f} GB{target}")


def imports(args, sides: dict[str, Path]) -> None:
    print("start-up: import cps.cli / cps --help (best of 3):")
    for side, source in sides.items():
        env = environment(source)
        figures = []
        for command in (
            [sys.executable, "-c", "import cps.cli"],
            [sys.executable, "-m", "cps", "--help"],
        ):
            best = min(run_measured(command, env, cwd=tempfile.gettempdir()).seconds for _ in range(3))
            figures.append(best)
        print(f"  {side:<5} import cps.cli {figures[0]:.2f} s, cps --help {figures[1]:.2f} s")
    heavy = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import cps.stages.prune, cps.stages.evaluate"],
        capture_output=True, text=True, env=environment(ROOT), cwd=tempfile.gettempdir(),
    ).stderr  # fmt: skip
    packages: dict[str, float] = {}  # top-level package -> cumulative seconds of its first import
    total = 0.0
    for line in heavy.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[0].startswith("import time:") and parts[1].strip().isdigit():
            name, seconds = parts[2].strip(), int(parts[1]) / 1e6
            total += seconds if not parts[2].startswith("  ") else 0.0  # not nested: the statement's own
            if "." not in name and not name.startswith("_") and name not in packages:
                packages[name] = seconds
    top = sorted(((s, n) for n, s in packages.items() if n != "cps"), reverse=True)[:6]
    print(
        f"  what `cps prune` / `cps eval` import: {total:.2f} s in all; the heaviest packages (nested "
        f"imports counted once): {', '.join(f'{n} {s:.2f} s' for s, n in top)}"
    )


CASES = {
    "throughput": throughput,
    "demo-cell": demo_cell,
    "process": process,
    "imports": imports,
    "items": items,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--against", default=STARTED_FROM, help="the commit to compare with ('' for none)")
    parser.add_argument("--profile", help="folder for the demo cell's cProfile statistics")
    parser.add_argument("--langs", default="en,sw")
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--protocol-langs", default="en,sw,zh")
    parser.add_argument("--protocol-docs", type=int, default=20)
    parser.add_argument("--protocol-seqlen", type=int, default=512)
    parser.add_argument("--sib-items", type=int, default=100, help="items: SIB items per language")
    parser.add_argument("--next-items", type=int, default=30, help="items: next-sentence items per language")
    parser.add_argument("--demo-cell-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.demo_cell_child:
        print(json.dumps(demo_cell_child(args.profile)))
        return
    sides = {"old": checkout(args.against)} if args.against else {}
    sides["new"] = ROOT
    for case in args.cases.split(","):
        if case not in CASES:
            raise SystemExit(f"unknown case {case!r}: one of {', '.join(CASES)}")
        CASES[case](args) if case == "throughput" else CASES[case](args, sides)  # type: ignore[operator]


if __name__ == "__main__":
    main()
