"""Quantization: GPTQ against a transcription of the reference algorithm, RTN's codes by hand, the
joint SparseGPT mode and GPTQ after pruning keeping exactly their masks, the codes artifact."""

from __future__ import annotations

import pytest
import torch

from cps.errors import CpsError
from cps.pruning.base import InputStats, MethodOptions, get_method
from cps.pruning.masks import SparsityTarget
from cps.pruning.quant import QuantGrid, load_quant, pack_codes, save_quant, unpack_codes


def _inputs(tokens: int, columns: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.eye(columns) + 0.4 * torch.randn(columns, columns, generator=generator)
    scales = torch.rand(columns, generator=generator) * 3 + 0.1
    return (torch.randn(tokens, columns, generator=generator) @ mixing) * scales


def reference_gptq(W, H, bits, groupsize, sym, actorder, blocksize=128, percdamp=0.01):
    """IST-DASLab/gptq `GPTQ.fasterquant` (static_groups=True: each group's grid fitted on the
    weights before the loop, as llm-compressor does) with its `Quantizer` (unsigned codes
    0..2^b-1, zero (2^b)/2 when symmetric), transcribed line by line."""
    W, H = W.clone().float(), H.clone().float()
    columns, maxq = W.shape[1], 2**bits - 1

    def find_params(x):
        xmin = torch.minimum(x.min(1).values, torch.zeros(x.shape[0]))
        xmax = torch.maximum(x.max(1).values, torch.zeros(x.shape[0]))
        if sym:
            xmax = torch.maximum(xmin.abs(), xmax)
            xmin = torch.where(xmin < 0, -xmax, xmin)
        both = (xmin == 0) & (xmax == 0)
        xmin[both], xmax[both] = -1, 1
        scale = (xmax - xmin) / maxq
        zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-xmin / scale)
        return scale.unsqueeze(1), zero.unsqueeze(1)

    def quantize(x, scale, zero):
        q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
        return scale * (q - zero)

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    width = columns if groupsize == -1 else groupsize
    groups = [find_params(W[:, i : i + width]) for i in range(0, columns, width)]
    perm = None
    if actorder:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    Q = torch.zeros_like(W)
    H[range(columns), range(columns)] += percdamp * torch.mean(torch.diag(H))
    H = torch.cholesky_inverse(torch.linalg.cholesky(H))
    Hinv = torch.linalg.cholesky(H, upper=True)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        for i in range(i2 - i1):
            w, d = W1[:, i], Hinv1[i, i]
            idx = i1 + i if perm is None else int(perm[i1 + i])
            q = quantize(w.unsqueeze(1), *groups[idx // width]).flatten()
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return Q if perm is None else Q[:, torch.argsort(perm)]


@pytest.mark.parametrize(
    ("bits", "group_size", "sym", "act_order", "blocksize"),
    [
        (4, 128, True, False, 128),
        (3, 64, False, True, 128),
        (4, -1, True, False, 32),
        (2, 32, True, True, 64),
    ],
)
def test_gptq_equals_the_reference_transcription(bits, group_size, sym, act_order, blocksize):
    X = _inputs(1024, 256)
    W = torch.randn(48, 256, generator=torch.Generator().manual_seed(1))
    options = MethodOptions(blocksize, bits=bits, group_size=group_size, sym=sym, act_order=act_order)
    ours = get_method("gptq", options).prune(W.clone(), InputStats(X.T @ X, 1024), SparsityTarget(0.0))
    expected = reference_gptq(W, 2 * X.T @ X / 1024, bits, group_size, sym, act_order, blocksize)
    codes, reference_codes = ours.quant.codes(ours.weight), ours.quant.codes(expected)
    assert (codes == reference_codes).float().mean() >= 0.999, "GPTQ's codes differ from the reference's"
    torch.testing.assert_close(ours.weight, expected, atol=1e-5, rtol=1e-5)
    # on its grid, and better than rounding to nearest on these inputs
    assert torch.equal(ours.quant.dequantize(codes), ours.weight)
    rtn = ours.quant.round(W)
    assert torch.sum(((W - ours.weight) @ X.T) ** 2) < torch.sum(((W - rtn) @ X.T) ** 2)


def test_rtn_codes_by_hand():
    W = torch.tensor([[0.7, -0.35, 0.1, 0.0], [2.0, 1.0, -3.0, 0.5]])
    # 2 bits, groups of 2, symmetric: codes -2..1, scale = max|w| / 1.5
    rtn = get_method("rtn", MethodOptions(bits=2, group_size=2, sym=True))
    done = rtn.prune(W, InputStats(None, 0), SparsityTarget(0.0))
    scale = torch.tensor([[0.7 / 1.5, 0.1 / 1.5], [2.0 / 1.5, 3.0 / 1.5]])
    torch.testing.assert_close(done.quant.scale, scale)
    # 0.7/0.4667 = 1.5 -> clamp 1; -0.35/0.4667 = -0.75 -> -1; 0.1/0.0667 = 1.5 -> 1 (clamped); 0 -> 0
    # 2/1.333 = 1.5 -> 1; 1/1.333 = 0.75 -> 1; -3/2 = -1.5 -> -2 (half to even); 0.5/2 = 0.25 -> 0
    expected = torch.tensor([[1, -1, 1, 0], [1, 1, -2, 0]], dtype=torch.int8)
    assert torch.equal(done.quant.codes(done.weight), expected)
    torch.testing.assert_close(done.weight, expected.float() * scale.repeat_interleave(2, dim=1))
    # asymmetric, 2 bits per row: scale (max - min) / 3, zero round(-2 - min / scale)
    asym = get_method("rtn", MethodOptions(bits=2, group_size=-1, sym=False))
    done = asym.prune(W, InputStats(None, 0), SparsityTarget(0.0))
    torch.testing.assert_close(done.quant.scale, torch.tensor([[1.05 / 3], [5.0 / 3]]))
    assert done.quant.zero.flatten().tolist() == [-1.0, 0.0]  # -2 + 0.35/0.35 = -1; -2 + 3/1.667 = -0.2
    # row 0: 0.7/0.35 - 1 = 1; -1 - 1 = -2; 0.29 - 1 -> -1; 0 -> -1 (the zero point: w = 0 exactly)
    assert done.quant.codes(done.weight)[0].tolist() == [1, -2, -1, -1]
    assert done.weight[0, 3] == 0


def test_grid_refusals():
    with pytest.raises(CpsError, match="--bits"):
        QuantGrid(9)
    with pytest.raises(CpsError, match="--group-size"):
        QuantGrid(4, 0)
    with pytest.raises(CpsError, match="must divide"):
        QuantGrid(4, 48).fit(torch.randn(4, 64))
    with pytest.raises(CpsError, match="needs --bits"):
        get_method("gptq").prune(torch.randn(4, 8), InputStats(torch.eye(8), 8), SparsityTarget(0.0))


def test_joint_sparsegpt_keeps_exactly_its_mask():
    X = _inputs(1024, 256, seed=3)
    W = torch.randn(64, 256, generator=torch.Generator().manual_seed(4))
    stats = InputStats(X.T @ X, 1024)
    for target in (SparsityTarget(0.5), SparsityTarget.parse("2:4", None)):
        joint = get_method("sparsegpt", MethodOptions(bits=4, group_size=64)).prune(W.clone(), stats, target)
        assert joint.mask.float().mean() == target.sparsity
        assert torch.all(joint.weight[joint.mask] == 0), "a pruned weight is not zero"
        codes = joint.quant.codes(joint.weight)
        assert torch.equal(joint.quant.dequantize(codes), joint.weight), "a kept weight is off the grid"
        # the grid is the dense weights' (fitted before the loop)
        torch.testing.assert_close(joint.quant.scale, QuantGrid(4, 64).fit(W).scale)
        alone = get_method("sparsegpt").prune(W.clone(), stats, target)
        error = torch.sum(((W - joint.weight) @ X.T) ** 2) / torch.sum(((W - alone.weight) @ X.T) ** 2)
        assert 1 < error < 1.5, "4 bits on top of the pruning cost more error, but not much more"


def test_gptq_after_pruning_holds_the_zeros():
    X = _inputs(1024, 128, seed=5)
    W = torch.randn(32, 128, generator=torch.Generator().manual_seed(6))
    stats = InputStats(X.T @ X, 1024)
    mask = get_method("wanda").prune(W, stats, SparsityTarget(0.5)).mask
    pruned = W.masked_fill(mask, 0)
    for name in ("gptq", "rtn"):
        quantizer = get_method(name, MethodOptions(bits=3, group_size=32))
        done = quantizer.quantize_group([pruned.clone()], stats, [mask])[0]
        assert torch.equal(done.mask, mask)
        assert torch.all(done.weight[mask] == 0)
        assert torch.equal(done.quant.dequantize(done.quant.codes(done.weight)), done.weight)
    # GPTQ moves the rounding error onto the kept weights only: better than RTN on the pruned ones
    gptq = get_method("gptq", MethodOptions(bits=3, group_size=32)).quantize_group([pruned], stats, [mask])[0]
    rtn = get_method("rtn", MethodOptions(bits=3, group_size=32)).quantize_group([pruned], stats, [mask])[0]
    assert torch.sum(((W - gptq.weight) @ X.T) ** 2) < torch.sum(((W - rtn.weight) @ X.T) ** 2)


def test_stacked_group_equals_one_at_a_time():
    """q, k and v quantized in one pass: each as if alone (rows are independent)."""
    X = _inputs(512, 64, seed=7)
    weights = [torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows)) for rows in (16, 8, 8)]
    stats = InputStats(X.T @ X, 512)
    gptq = get_method("gptq", MethodOptions(bits=4, group_size=32, act_order=True))
    together = gptq.prune_group([w.clone() for w in weights], stats, SparsityTarget(0.0))
    for weight, done in zip(weights, together, strict=True):
        alone = gptq.prune(weight.clone(), stats, SparsityTarget(0.0))
        torch.testing.assert_close(done.weight, alone.weight, atol=1e-6, rtol=1e-6)
        assert torch.equal(done.quant.scale, alone.quant.scale)


def test_codes_artifact_round_trip(tmp_path):
    for bits, columns in ((4, 64), (3, 63), (8, 64)):
        W = torch.randn(8, columns)
        params = QuantGrid(bits, -1, sym=bits != 3).fit(W)
        rounded = params.round(W)
        codes = params.codes(rounded)
        assert torch.equal(unpack_codes(pack_codes(codes, bits), bits, columns), codes)
        path = str(tmp_path / f"quant{bits}.safetensors")
        save_quant(path, {"model.layers.0.mlp.up_proj": params}, lambda name, w=rounded: w)
        ((loaded, stored),) = load_quant(path).values()
        assert torch.equal(stored, codes)
        assert torch.equal(loaded.dequantize(stored), rounded)


def test_codes_of_bfloat16_weights_give_the_stored_values_back():
    """8 bits asymmetric in bfloat16: (code - zero) x scale rounded to bfloat16 can land past half
    a step, where the nearest code would not give the stored weight back; its neighbour does."""
    torch.manual_seed(0)  # (6 of these weights' nearest codes are off by one)
    weight = torch.distributions.StudentT(3.0).sample((512, 1024))
    params = QuantGrid(8, 128, sym=False).fit(weight, torch.bfloat16)
    stored = params.round(weight).to(torch.bfloat16)
    nearest = params.codes(stored.float())
    codes = params.codes(stored)
    assert torch.equal(params.dequantize(codes).to(torch.bfloat16), stored)
    assert (params.dequantize(nearest).to(torch.bfloat16) != stored).any(), "the case is exercised"
    assert (codes != nearest).sum() <= (params.dequantize(nearest).to(torch.bfloat16) != stored).sum()


def test_gptq_after_wanda_keeps_wandas_own_masks():
    """Wanda followed by GPTQ in the engine: on the same inputs its masks are bit for bit those of
    Wanda alone (its column squares summed as always, beside the X^T X GPTQ reads), their zeros
    stored, the kept weights on the grid; the dampening GPTQ ran with is logged."""
    from cps.config import CalibrationConfig, PruneConfig
    from cps.models import load_model
    from cps.pruning.engine import prune_model

    ids = torch.randint(0, 1000, (8, 64), generator=torch.Generator().manual_seed(0))
    calibration = CalibrationConfig("tiny-llama", "sw", nsamples=8, seqlen=64)
    masks = {}
    for bits in (None, 4):
        config = PruneConfig("tiny-llama", "wanda", calibration, bits=bits, group_size=32, dampening=0.05)
        model = load_model("tiny-llama", tokenizer=False).model
        method = get_method(config.method_name, config.options)
        result = prune_model(model, ids, method, config.target, config.engine, plan=config.plan)
        masks[bits] = result.masks
        if bits is not None:
            assert config.identity()["dampening"] == 0.05 and config.plan.quantizer.options.dampening == 0.05
            modules = dict(model.named_modules())
            for name, params in result.quant.items():
                weight = modules[name].weight.data
                assert torch.all(weight[result.masks[name]] == 0)
                assert torch.equal(params.dequantize(params.codes(weight)), weight)
    assert masks[None].keys() == masks[4].keys()
    # layer 0 reads the same inputs either way (later layers read the quantized layers' outputs)
    first = [name for name in masks[None] if ".layers.0." in name]
    assert first and all(torch.equal(masks[None][name], masks[4][name]) for name in first)
