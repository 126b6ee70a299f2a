"""llm-compressor's side of `gptq_fidelity.py`: GPTQModifier (W4A16) on saved calibration windows, in
the peer venv (llm-compressor 0.14, its own transformers), and the perplexity both sides compute.

    .venv-peer/bin/python benchmarks/gptq_peer.py --model DIR --calib calib.pt --eval eval.pt \
        --out peer.pt [--actorder static] [--dense]

Imports only torch at the top: `gptq_fidelity.py` (the cps venv) imports `perplexity` and
`integer_codes` from here, so both sides run the same code.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn

GROUP_SIZE = 128
BITS = 4


def perplexity(model: nn.Module, lines: list[torch.Tensor]) -> float:
    """exp(total NLL / total predicted tokens) over `lines` (each a 1-D id tensor, scored alone):
    tokens 1..n given their prefix, fp32, a plain Hugging Face forward per line."""
    model.eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for ids in lines:
            logits = model(ids[None]).logits[0].float()  # (n, vocab)
            nll = nn.functional.cross_entropy(logits[:-1], ids[1:], reduction="sum")
            total += nll.item()
            count += ids.numel() - 1
    return math.exp(total / count)


def integer_codes(
    weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None
) -> torch.Tensor:
    """The int8 codes of a fake-quantized W (out, in) with scale (and zero) (out, groups):
    round(W / scale + zero), clamped to the 4-bit range."""
    columns = weight.shape[1]
    width = columns // scale.shape[1]
    codes = weight.float() / scale.float().repeat_interleave(width, dim=1)
    if zero is not None:
        codes = codes + zero.float().repeat_interleave(width, dim=1)
    return codes.round().clamp(-(2 ** (BITS - 1)), 2 ** (BITS - 1) - 1).to(torch.int8)


def quantized_grid(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Every decoder layer's linears after oneshot, keyed `<layer>.<name inside it>` (e.g.
    0.self_attn.q_proj): their int8 codes (out, in), and their scales (out, groups)."""
    codes, scales = {}, {}
    for index, layer in enumerate(model.model.layers):
        for name, module in layer.named_modules():
            if not isinstance(module, nn.Linear):
                continue
            key, scale = f"{index}.{name}", module.weight_scale.detach().float()
            codes[key] = integer_codes(module.weight, scale, getattr(module, "weight_zero_point", None))
            scales[key] = scale
            grid = codes[key].float() * scale.repeat_interleave(
                module.weight.shape[1] // scale.shape[1], dim=1
            )
            if not torch.allclose(module.weight.float(), grid, rtol=1e-5, atol=0):
                raise SystemExit(f"{key}: llm-compressor's weights are not codes x scale")
    return codes, scales


def quantize(model: nn.Module, input_ids: torch.Tensor, actorder: str | None) -> float:
    """llm-compressor's oneshot GPTQ (W4A16: int4, symmetric, group 128) on exactly the windows
    `input_ids` (n, L): no shuffle, no truncation, one window per batch, the sequential pipeline
    (a decoder layer per subgraph). Seconds of the oneshot call."""
    # (here, not at the top: the cps venv imports this module for `perplexity` and has no llmcompressor)
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier

    windows, length = input_ids.shape
    dataset = Dataset.from_dict(
        {"input_ids": input_ids.tolist(), "attention_mask": torch.ones_like(input_ids).tolist()}
    )
    recipe = GPTQModifier(
        targets="Linear",
        scheme="W4A16",
        ignore=["lm_head"],
        actorder=actorder,
        block_size=GROUP_SIZE,
        dampening_frac=0.01,
    )
    started = time.perf_counter()
    oneshot(
        model=model,
        dataset=dataset,
        recipe=recipe,
        num_calibration_samples=windows,
        max_seq_length=length,
        shuffle_calibration_samples=False,
        batch_size=1,
        pipeline="sequential",
    )
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="folder of the dense model (cps's conversion)")
    parser.add_argument("--calib", required=True, help="torch.save'd calibration input ids (n, L)")
    parser.add_argument("--eval", required=True, help="torch.save'd list of 1-D id tensors")
    parser.add_argument("--out", required=True)
    parser.add_argument("--actorder", default="none", choices=["none", "static", "weight", "group"])
    parser.add_argument("--dense", action="store_true", help="also the dense model's perplexity")
    args = parser.parse_args()

    import llmcompressor
    import transformers
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.eval()
    lines = torch.load(args.eval)
    input_ids = torch.load(args.calib)
    dense = perplexity(model, lines) if args.dense else None
    seconds = quantize(model, input_ids, None if args.actorder == "none" else args.actorder)
    codes, scales = quantized_grid(model)
    torch.save(
        {
            "codes": codes,
            "scales": scales,
            "perplexity": perplexity(model, lines),
            "dense_perplexity": dense,
            "seconds": seconds,
            "actorder": args.actorder,
            "threads": torch.get_num_threads(),
            "versions": {
                "llmcompressor": llmcompressor.__version__,
                "transformers": transformers.__version__,
                "torch": str(torch.__version__),
            },
        },
        args.out,
    )


if __name__ == "__main__":
    main()
