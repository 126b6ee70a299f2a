"""compressed-tensors checkpoints (`cps.pruning.compressed`): a folder `write_compressed` turned
loads through plain transformers as the in-memory quantized model (same logits, same weights, a
pruned weight's zeros kept) and gives back the codes it was written with."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM

from cps.errors import CpsError
from cps.models import decoder_layers, load_model
from cps.pruning.compressed import load_kwargs, quantized_config, read_codes, write_compressed
from cps.pruning.quant import QuantGrid, QuantParams

W4G32 = QuantGrid(4, 32, True)  # 32 divides both widths of the tiny models (64, MLP 128)
W3_ASYM = QuantGrid(3, -1, False)  # per channel; 3 bits straddle the int32 words when packed
W8 = QuantGrid(8, -1, True)
IDS = torch.tensor([[1, 17, 256, 4000, 9, 33, 2]])

# An asymmetric grid loads with `dequantize=True`, for which transformers warns that the folder's
# config is used with that loading attribute: expected, not a defect.
pytestmark = pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")


def quantize(
    model: nn.Module, grid_of: Callable[[str], QuantGrid], prune: bool = False
) -> dict[str, QuantParams]:
    """RTN, in place, every linear of the decoder layers on the grid `grid_of(name)` gives it,
    after zeroing every other entry of each row when `prune`; returns each linear's grid."""
    names = {module: name for name, module in model.named_modules()}
    quant = {}
    for layer in decoder_layers(model):
        for module in layer.modules():
            if not isinstance(module, nn.Linear):
                continue
            weight = module.weight.data  # (out, in)
            if prune:
                weight[:, ::2] = 0
            params = grid_of(names[module]).fit(weight)
            module.weight.data = params.round(weight)
            quant[names[module]] = params
    return quant


def saved(model: nn.Module, quant: dict[str, QuantParams], folder: Path, shard: str | None = None) -> Path:
    model.save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    write_compressed(folder, quant)
    return folder


def loaded(folder: Path) -> nn.Module:
    kwargs = load_kwargs(folder)
    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True, **kwargs)
    assert not any(info.values()), info
    return model.eval()


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def stored(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors files."""
    tensors = {}
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as handle:
            tensors |= {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    return tensors


def compressed_by_compressed_tensors(weight: torch.Tensor, params: QuantParams, scheme: dict) -> dict:
    """What compressed-tensors' own pack-quantized compressor (llm-compressor's save path) stores
    for W on this grid."""
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    state = {"weight": weight, "weight_scale": params.scale, "weight_zero_point": params.zero.to(torch.int8)}
    return PackedQuantizationCompressor.compress(state, QuantizationScheme.model_validate(scheme))


@pytest.mark.parametrize(
    ("name", "grid", "shard"),
    [
        ("tiny-llama", W4G32, None),
        ("tiny-llama", W3_ASYM, None),
        ("tiny-gemma3", W3_ASYM, "2MB"),  # sharded: the index follows
    ],
)
def test_transformers_loads_the_quantized_model(tmp_path, name, grid, shard):
    model = load_model(name, tokenizer=False).model
    quant = quantize(model, lambda _: grid)
    folder = saved(model, quant, tmp_path, shard)
    if shard:
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1
        assert set(index["weight_map"]) == set(stored(folder))

    torch.testing.assert_close(logits(loaded(folder)), logits(model), rtol=0, atol=1e-5)

    codes = dict(read_codes(folder))
    assert codes.keys() == quant.keys()
    for module, params in quant.items():
        expected = params.codes(model.get_submodule(module).weight.data)
        assert codes[module].dtype == torch.int8 and torch.equal(codes[module], expected), module
    first = next(iter(quant))
    assert [module for module, _ in read_codes(folder, [first])] == [first]

    config = quantized_config(folder)
    assert config == json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    (group,) = config["config_groups"].values()
    tensors = stored(folder)
    for module, params in quant.items():
        assert f"{module}.weight" not in tensors
        reference = compressed_by_compressed_tensors(model.get_submodule(module).weight.data, params, group)
        own = {key.removeprefix(f"{module}.") for key in tensors if key.startswith(f"{module}.")}
        assert reference.keys() == own
        for key, tensor in reference.items():
            assert torch.equal(tensors[f"{module}.{key}"], tensor), (module, key)
    assert group["targets"] == list(quant)
    assert group["weights"]["num_bits"] == grid.bits and group["weights"]["symmetric"] == grid.sym
    assert {"lm_head", "model.embed_tokens"} <= set(config["ignore"])


@pytest.mark.parametrize("grid", [W4G32, W3_ASYM])
def test_a_pruned_weight_keeps_exactly_its_zeros(tmp_path, grid):
    model = load_model("tiny-llama", tokenizer=False).model
    quant = quantize(model, lambda _: grid, prune=True)
    reloaded = loaded(saved(model, quant, tmp_path))
    logits(reloaded)  # the default path decompresses on the first forward
    for module in quant:
        weight = reloaded.get_submodule(module).weight.data
        assert torch.equal(weight, model.get_submodule(module).weight.data), module
        assert (weight[:, ::2] == 0).all(), module
    for module, codes in read_codes(tmp_path):
        zero = quant[module].expanded(codes.shape[1])[1]  # the code of 0
        assert torch.equal(codes[:, ::2].float(), zero[:, ::2]), module


def test_grids_of_their_own_are_config_groups_of_their_own(tmp_path):
    model = load_model("tiny-llama", tokenizer=False).model
    quant = quantize(model, lambda name: W4G32 if "self_attn" in name else W8)
    folder = saved(model, quant, tmp_path)

    groups = quantized_config(folder)["config_groups"].values()
    grids = [(group["weights"]["num_bits"], group["weights"]["strategy"]) for group in groups]
    assert grids == [(4, "group"), (8, "channel")]
    assert sorted(t for g in groups for t in g["targets"]) == sorted(quant)
    assert load_kwargs(folder) == {}
    torch.testing.assert_close(logits(loaded(folder)), logits(model), rtol=0, atol=1e-5)


def test_asymmetric_grids_among_several_are_refused_for_transformers(tmp_path):
    model = load_model("tiny-llama", tokenizer=False).model
    quant = quantize(model, lambda name: W3_ASYM if "self_attn" in name else W8)
    folder = saved(model, quant, tmp_path)
    with pytest.raises(CpsError, match="asymmetric grids"):
        load_kwargs(folder)


def test_a_weight_off_its_grid_leaves_the_folder_untouched(tmp_path):
    model = load_model("tiny-llama", tokenizer=False).model
    quant = quantize(model, lambda _: W4G32)
    last = list(quant)[-1]
    model.get_submodule(last).weight.data[0, 0] += 1e-3
    model.save_pretrained(tmp_path)
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    with pytest.raises(CpsError, match="not on its w4g32 grid"):
        write_compressed(tmp_path, quant)
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before
    assert quantized_config(tmp_path) is None
