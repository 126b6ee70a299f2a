"""RIA's scores and masks against hand-computed values and the reference's formula; ShortGPT's Block
Influence against hooks written here, its removed layers as the identity, its saved model."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from cps import tracking
from cps.config import CalibrationConfig, EvalConfig, PruneConfig
from cps.errors import CpsError
from cps.models import LoadOptions, decoder_layers, load_model, without_layers
from cps.pruning.base import InputStats, get_method
from cps.pruning.engine import EngineConfig, prune_model
from cps.pruning.masks import SparsityTarget
from cps.pruning.ria import ria_scores
from cps.runs import REMOVED_LAYERS_TAG
from cps.stages.evaluate import run_eval
from cps.stages.prune import run_prune

# ---------------------------------------------------------------------------------------------
# RIA


def test_ria_scores_and_mask_by_hand():
    """W = [[1, -2, 3], [4, 0, -1]], ||X_j||^2 = [1, 16, 81] (so ||X_j||^0.5 = [1, 2, 3]).
    |W| column sums [5, 2, 4], row sums [6, 5]:
      S = [[(1/5 + 1/6) * 1, (2/2 + 2/6) * 2, (3/4 + 3/6) * 3],
           [(4/5 + 4/5) * 1, 0,               (1/4 + 1/5) * 3]]
        = [[0.36667, 2.66667, 3.75], [1.6, 0, 1.35]].
    50% over the whole matrix prunes the 3 lowest: (1,1), (0,0), (1,2)."""
    W = torch.tensor([[1.0, -2.0, 3.0], [4.0, 0.0, -1.0]])
    stats = InputStats(None, tokens=10, squares=torch.tensor([1.0, 16.0, 81.0]))
    expected = torch.tensor(
        [[1 / 5 + 1 / 6, (1 + 1 / 3) * 2, (3 / 4 + 1 / 2) * 3], [1.6, 0.0, (1 / 4 + 1 / 5) * 3]]
    )
    torch.testing.assert_close(ria_scores(W, stats.column_norms()), expected, rtol=1e-6, atol=1e-7)
    mask = get_method("ria").prune(W, stats, SparsityTarget(0.5)).mask
    assert mask.tolist() == [[True, False, False], [False, True, True]]


def test_ria_equals_the_reference_formula_unstructured_and_2_4():
    """The reference (lib/prune.py, prune_ria): W_metric from the mean-of-squares `scaler_row`,
    unstructured: entries at or below the int(numel * s)-th smallest (sorted flat) pruned; N:M:
    the N lowest of every M columns per row (topk largest=False). cps prunes exactly the count."""
    generator = torch.Generator().manual_seed(0)
    W = torch.randn(16, 32, generator=generator)
    X = torch.randn(4, 64, 32, generator=generator) * torch.rand(32, generator=generator) * 3
    samples = X.shape[0]
    scaler_row = sum(torch.norm(x.T, p=2, dim=1) ** 2 / samples for x in X)  # WrappedGPT's running mean
    reference_metric = (
        torch.abs(W) / torch.sum(torch.abs(W), dim=0)
        + torch.abs(W) / torch.sum(torch.abs(W), dim=1).reshape(-1, 1)
    ) * (torch.sqrt(scaler_row.reshape((1, -1)))) ** 0.5
    stats = InputStats(None, tokens=4 * 64, squares=(X.reshape(-1, 32) ** 2).sum(0))
    method = get_method("ria")
    for sparsity in (0.5, 0.7):
        threshold = torch.sort(reference_metric.flatten())[0][int(W.numel() * sparsity)]
        reference = reference_metric <= threshold
        # the reference also prunes the threshold entry itself: one weight more than the target
        ours = method.prune(W, stats, SparsityTarget(sparsity)).mask
        assert int(ours.sum()) == int(W.numel() * sparsity) == int(reference.sum()) - 1
        assert not (ours & ~reference).any()  # every weight cps prunes the reference prunes too
    reference_nm = torch.zeros_like(W, dtype=torch.bool)
    for start in range(0, W.shape[1], 4):
        block = reference_metric[:, start : start + 4]
        reference_nm.scatter_(1, start + torch.topk(block, 2, dim=1, largest=False)[1], True)
    assert torch.equal(method.prune(W, stats, SparsityTarget.parse("2:4", None)).mask, reference_nm)


# ---------------------------------------------------------------------------------------------
# ShortGPT


def _block_influence_by_hooks(model: torch.nn.Module, ids: torch.Tensor) -> list[float]:
    """BI_i = 1 - mean over every token of cos(input of layer i, its output), from hooks on the
    model's own forward."""
    cosines: dict[int, list[torch.Tensor]] = {}
    handles = []
    for index, layer in enumerate(decoder_layers(model)):

        def hook(module, args, kwargs, output, index=index):
            hidden_in = args[0] if args else kwargs["hidden_states"]
            hidden_out = output[0] if isinstance(output, tuple) else output
            cosines.setdefault(index, []).append(
                torch.nn.functional.cosine_similarity(
                    hidden_in.double(), hidden_out.double(), dim=-1
                ).flatten()
            )

        handles.append(layer.register_forward_hook(hook, with_kwargs=True))
    with torch.no_grad():
        model(ids, use_cache=False)
    for handle in handles:
        handle.remove()
    return [1 - torch.cat(cosines[index]).mean().item() for index in sorted(cosines)]


def test_block_influence_and_the_removed_layers(tiny_ids):
    """The engine's Block Influence equals the hooks' to 1e-5; the lowest int(L * s) go; their
    linears are zeroed (masks all True), which makes them the identity: the pruned model's logits
    equal the model with those layers taken out."""
    model = load_model("tiny-gemma3", LoadOptions("float32", "cpu"), tokenizer=False).model
    expected = _block_influence_by_hooks(model, tiny_ids)
    method = get_method("shortgpt")
    result = prune_model(model, tiny_ids, method, SparsityTarget(0.5), EngineConfig(error_sample=None))
    assert result.block_influence == pytest.approx(expected, abs=1e-5)
    lowest = sorted(sorted(range(4), key=lambda i: expected[i])[:2])
    assert result.removed_layers == lowest
    for name, mask in result.masks.items():
        layer = int(name.split(".")[2])
        assert bool(mask.all()) == (layer in lowest) and bool(mask.any()) == (layer in lowest)
    removed = [s for s in result.stats if s.layer in lowest]
    assert all(s.snr_db == 0.0 for s in removed) and all(
        s.error == 0 for s in result.stats if s.layer not in lowest
    )
    with torch.no_grad():
        zeroed = model(tiny_ids).logits
        with without_layers(model, lowest):
            assert len(decoder_layers(model)) == 2
            taken_out = model(tiny_ids).logits
    torch.testing.assert_close(taken_out, zeroed, rtol=0, atol=1e-6)
    assert len(decoder_layers(model)) == 4 and model.config.num_hidden_layers == 4


@pytest.fixture
def tiny_ids() -> torch.Tensor:
    return torch.randint(3, 250, (4, 32), generator=torch.Generator().manual_seed(1))


def test_shortgpt_run_saves_a_shorter_model_that_loads_and_evaluates(store, tmp_path):
    """`cps prune --method shortgpt`: the saved model has the layers taken out (config, layer types)
    and plain `from_pretrained` gives the in-memory pruned model's logits; `cps eval` scores it
    (rebuilt as dense x masks, the stack kept) like the model in memory."""
    calibration = CalibrationConfig("tiny-gemma3", "sw", nsamples=4, seqlen=32)
    config = PruneConfig("tiny-gemma3", "shortgpt", calibration, sparsity=0.5)
    result = run_prune(config, store, keep_model=True)
    record = tracking.get_run(store, result.run_id)
    removed = json.loads(record.tags[REMOVED_LAYERS_TAG])
    assert len(removed) == 2 and record.metrics["layers.removed"] == 2
    assert record.metrics["sparsity.actual"] == pytest.approx(0.5)
    folder = tracking.logged_model_folder(store, result.run_id, tmp_path)
    saved = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    dense_types = result.model.model.config.layer_types
    assert saved.config.num_hidden_layers == 2
    assert saved.config.layer_types == [t for i, t in enumerate(dense_types) if i not in removed]
    ids = result.calib.input_ids[:2]
    with torch.no_grad():
        torch.testing.assert_close(saved(ids).logits, result.model.model(ids).logits, rtol=1e-5, atol=1e-5)
    evaluated = run_eval(EvalConfig(langs=("sw",), seqlen=64, max_docs=2), store, result.run_id)
    assert (
        tracking.get_run(store, result.run_id).tags["cps.eval.weights"]
        == "the dense checkpoint x the run's masks"
    )
    assert evaluated.metrics["snr_db.sw"] < 30  # half the layers gone: far from the dense model


def test_impossible_combinations_fail_in_one_line():
    calibration = CalibrationConfig("tiny-llama", "sw", nsamples=2, seqlen=32)
    for kwargs, message in [
        ({"method": "shortgpt", "pattern": "2:4"}, "no N:M form"),
        ({"method": "shortgpt", "allocation": "owl"}, "removes whole layers"),
        ({"method": "wanda", "allocation": "owl", "pattern": "2:4"}, "OWL allocates unstructured"),
        ({"method": "sparsegpt", "refine": "dsnot"}, "changes the kept weights"),
        ({"method": "wanda", "allocation": "owls"}, "unknown allocation"),
        ({"method": "wanda", "refine": "dsnots"}, "unknown refinement"),
        ({"method": "wanda", "owl_lambda": 0.6, "allocation": "owl"}, "owl-lambda"),
    ]:
        with pytest.raises(CpsError, match=message):
            PruneConfig("tiny-llama", calibration=calibration, **kwargs)


# ---------------------------------------------------------------------------------------------
# DSnoT inside the engine


def test_engine_gathers_the_moments_dsnot_reads_and_refines_wandas_masks(tiny_ids):
    """Across batches of two windows, the engine's column sums, per-window variances and window
    count for layer 0's q/k/v input equal those of the input captured here; the refined mask is
    `dsnot_refine` of Wanda's mask on those statistics, and differs from Wanda's."""
    from cps.pruning.base import MethodOptions
    from cps.pruning.dsnot import DSnoT
    from cps.pruning.engine import PrunePlan

    model = load_model("tiny-llama", LoadOptions("float32", "cpu"), tokenizer=False).model
    captured = []
    q_proj = decoder_layers(model)[0].self_attn.q_proj
    handle = q_proj.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach().clone()))
    with torch.no_grad():
        model(tiny_ids, use_cache=False)
    handle.remove()
    X = captured[0]  # (windows, L, in)
    W = q_proj.weight.detach().clone()
    seen = {}

    class Recorded(DSnoT):
        def refine(self, module, weight, mask, stats, target):
            seen.setdefault(module, (stats, mask.clone()))
            return super().refine(module, weight, mask, stats, target)

    refinement = Recorded(MethodOptions(dsnot_skip="none", dsnot_threshold=0.01))
    config = EngineConfig(batch_tokens=2 * tiny_ids.shape[1])  # two windows a batch
    result = prune_model(
        model, tiny_ids, get_method("wanda"), SparsityTarget(0.5), config, plan=PrunePlan(None, refinement)
    )
    stats, wanda_mask = seen["self_attn.q_proj"]
    assert stats.windows == 4 and stats.tokens == X.shape[0] * X.shape[1]
    torch.testing.assert_close(stats.sums, X.sum(dim=(0, 1)), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(
        stats.window_var, torch.var(X, dim=1, unbiased=False).mean(dim=0), rtol=1e-5, atol=1e-5
    )
    refined = result.masks["model.layers.0.self_attn.q_proj"]
    assert torch.equal(
        refined,
        DSnoT(MethodOptions(dsnot_skip="none", dsnot_threshold=0.01)).refine(
            "self_attn.q_proj", W, wanda_mask, stats, SparsityTarget(0.5)
        ),
    )
    assert not torch.equal(refined, wanda_mask)
    assert torch.equal(refined.sum(dim=1), wanda_mask.sum(dim=1))
