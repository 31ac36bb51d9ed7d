"""2:4 sparsification of whole models against direct computations: the masks, Wanda's scores on the outputs of the
already sparse layers, SparseGPT's update against an explicit-inverse OBS reference, the sparse model against the
masked dense model, and the three ways the output reloads."""

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from tinymodels import byte_tokenizer, tiny_bert, tiny_decoder, token_batch
from transformers import AutoModelForCausalLM

import fastprune
from fastprune.adapters import adapter_for
from fastprune.config import CalibrationConfig, PruningConfig
from fastprune.errors import ConfigError
from fastprune.ops import Sparse24Linear
from fastprune.remote.modeling_fastprune import decompress_sparse24
from fastprune.sparsity import SparsifyConfig, save_sparsified, sparsify
from fastprune.sparsity.sparsegpt import sparsegpt_24

CAL = CalibrationConfig(num_samples=4, seq_len=40, batch_size=2)
CRITERIA = ("magnitude", "wanda", "sparsegpt")


def config(criterion: str, **kw) -> SparsifyConfig:
    return SparsifyConfig(criterion=criterion, calibration=CAL, **kw)


def sparse_layers(model) -> dict[str, Sparse24Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, Sparse24Linear)}


def keep_mask(m: Sparse24Linear) -> torch.Tensor:
    """The kept positions, read off the compressed layout (ones through decompress)."""
    return decompress_sparse24(torch.ones_like(m.values), m.meta) != 0


def masked_dense(sparse_model) -> torch.nn.Module:
    """A plain copy with every 2:4 layer as nn.Linear holding its decompressed weight."""
    from fastprune.sparsity.modules import densify

    return densify(copy.deepcopy(sparse_model))


def top2_mask(score: torch.Tensor) -> torch.Tensor:
    """The 2 highest scores of every 4 consecutive inputs (random scores: no ties)."""
    groups = score.view(score.shape[0], -1, 4)
    idx = groups.topk(2, dim=-1).indices
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True).view(score.shape)


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def decoder():
    return tiny_decoder(heads=6, kv_heads=2, layers=3, channels=44)


@pytest.fixture(scope="module")
def results(decoder, tokenizer):
    return {c: sparsify(decoder, config(c), "pydoc:calibration", tokenizer) for c in CRITERIA}


@pytest.mark.parametrize("criterion", CRITERIA)
def test_every_block_linear_keeps_exactly_2_of_every_4_inputs(decoder, results, criterion):
    result = results[criterion]
    layers = sparse_layers(result.model)
    assert sorted(layers) == sorted(result.modules) and len(layers) == 3 * 7 and not result.skipped
    for name, m in layers.items():
        mask = keep_mask(m)
        assert mask.shape == decoder.get_submodule(name).weight.shape
        assert (mask.view(m.out_features, -1, 4).sum(-1) == 2).all(), name
        dense = m.dense_weight()
        assert torch.equal(dense != 0, mask | (dense != 0) & mask)  # nothing outside the mask
    # The embeddings and lm_head stay as they were.
    assert result.model.lm_head.weight.shape == decoder.lm_head.weight.shape


def test_magnitude_keeps_the_two_largest_weights_unchanged(decoder, results):
    for name, m in sparse_layers(results["magnitude"].model).items():
        w = decoder.get_submodule(name).weight
        mask = top2_mask(w.abs())
        assert torch.equal(keep_mask(m), mask), name
        assert torch.equal(m.dense_weight(), torch.where(mask, w, 0.0)), name


def _linear_inputs(model, names, batches):
    """Sum of squares per input feature of each named module, over the batches (direct hooks, float64)."""
    sums = {n: 0 for n in names}

    def hook(name):
        return lambda _m, args: sums.__setitem__(
            name, sums[name] + args[0].detach().double().pow(2).flatten(0, -2).sum(0)
        )

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    with torch.no_grad():
        for b in batches:
            model(input_ids=b, use_cache=False)
    for h in handles:
        h.remove()
    return sums


def test_wanda_scores_each_layer_on_the_outputs_of_the_sparse_layers_before_it(decoder, results, tokenizer):
    from fastprune.data import read_text, token_windows

    sparse = results["wanda"].model
    batches = token_windows(tokenizer, read_text("pydoc:calibration"), 40, 4).batches(2)
    reference = copy.deepcopy(decoder)  # layers before i sparse (as the result has them), layer i still dense
    for i in range(3):
        names = [n for n in sparse_layers(sparse) if f"layers.{i}." in n]
        sums = _linear_inputs(reference, names, batches)
        for n in names:
            w = decoder.get_submodule(n).weight.double()
            expected = top2_mask(w.abs() * sums[n].sqrt())
            assert torch.equal(keep_mask(sparse.get_submodule(n)), expected), n
            assert torch.equal(sparse.get_submodule(n).dense_weight(), torch.where(expected, w.float(), 0.0))
        reference.model.layers[i] = masked_dense(sparse).model.layers[i]


def reference_sparsegpt(w: torch.Tensor, x: torch.Tensor, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """OBS column by column with explicit inverses of H restricted to the columns not yet processed (float64)."""
    h = x.double().T @ x.double()
    h += damping * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)
    w = w.double().clone()
    keep = torch.zeros(w.shape, dtype=torch.bool)
    for i in range(w.shape[1]):
        hinv = torch.linalg.inv(h[i:, i:])
        if i % 4 == 0:
            d = torch.stack([torch.linalg.inv(h[j:, j:])[0, 0] for j in range(i, i + 4)])
            keep[:, i : i + 4] = top2_mask(w[:, i : i + 4].pow(2) / d)
        err = torch.where(keep[:, i], 0.0, w[:, i]) / hinv[0, 0]
        w[:, i:] -= err[:, None] * hinv[0][None, :]
    return torch.where(keep, w, 0.0), keep


@pytest.mark.parametrize(("rows", "cols", "block"), [(7, 24, 8), (5, 20, 128), (3, 12, 4)])
def test_sparsegpt_matches_the_obs_update_with_explicit_inverses(rows, cols, block):
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(200, cols, generator=gen) @ torch.randn(cols, cols, generator=gen)  # correlated inputs
    w = torch.randn(rows, cols, generator=gen)
    got, keep = sparsegpt_24(w, x.T.double() @ x.double(), damping=0.01, block_size=block)
    expected, expected_keep = reference_sparsegpt(w, x, 0.01)
    assert torch.equal(keep, expected_keep)
    torch.testing.assert_close(got, expected.float(), atol=1e-4, rtol=1e-4)
    # The update is what makes it better than masking alone: lower output error on the calibration inputs.
    assert ((w - got) @ x.T).norm() < ((w - torch.where(keep, w, 0.0)) @ x.T).norm()


def test_sparsegpt_zeroes_inputs_that_never_occur():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(100, 8, generator=gen)
    x[:, 3] = 0
    got, keep = sparsegpt_24(torch.randn(4, 8, generator=gen), x.T.double() @ x.double())
    assert (got[:, 3] == 0).all() and (keep.view(4, 2, 4).sum(-1) == 2).all()


@pytest.mark.parametrize("criterion", CRITERIA)
def test_sparse_model_equals_the_masked_dense_model(results, criterion):
    sparse = results[criterion].model
    ids = token_batch(2, 23)
    with torch.no_grad():
        torch.testing.assert_close(sparse(ids).logits, masked_dense(sparse)(ids).logits, atol=1e-4, rtol=1e-4)


def test_bert_encoders_are_sparsified_layer_by_layer(tokenizer):
    model = tiny_bert(heads=4, layers=2, channels=36)
    result = sparsify(model, config("sparsegpt"), "pydoc:calibration", tokenizer)
    assert len(result.modules) == 2 * 6
    ids = token_batch(2, 17)
    with torch.no_grad():
        a = result.model(input_ids=ids).last_hidden_state
        b = masked_dense(result.model)(input_ids=ids).last_hidden_state
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_skip_list_leaves_named_layers_dense(decoder, tokenizer):
    result = sparsify(
        decoder, config("wanda", skip=("layers.0", "down_proj", "lm_head")), "pydoc:calibration", tokenizer
    )
    names = set(sparse_layers(result.model))
    assert not any("layers.0." in n or "down_proj" in n for n in names)
    assert len(names) == 2 * 6 and len(result.skipped) == 7 + 2
    assert isinstance(result.model.model.layers[0].self_attn.q_proj, torch.nn.Linear)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pattern": "4:8"}, "pattern must be 2:4"),
        ({"pattern": "1:4"}, "pattern must be 2:4"),
        ({"criterion": "taylor"}, "criterion must be one of"),
        ({"block_size": 6}, "multiple of 4"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        SparsifyConfig(**kwargs)


def test_bad_layers_are_refused_before_any_work(tokenizer):
    model = tiny_decoder(layers=2, channels=42)  # down_proj reads 42 inputs: not groups of 4
    with pytest.raises(ConfigError, match=r"model.layers.0.mlp.down_proj \(42\)"):
        sparsify(model, config("magnitude"))
    with pytest.raises(ConfigError, match="matches no module"):
        sparsify(model, config("magnitude", skip=("layers.7",)))
    assert sparsify(model, config("magnitude", skip=("down_proj",))).modules  # skipping them works


IDS = token_batch(2, 21)


@pytest.fixture(scope="module")
def saved(results, tokenizer, tmp_path_factory):
    """A sparsegpt model saved compressed and dense, and a structured-pruned model with per-layer widths then made
    2:4-sparse, saved compressed; with the logits of each compressed one loaded by trust_remote_code."""
    root = tmp_path_factory.mktemp("sparse")
    save_sparsified(results["sparsegpt"], tokenizer, root / "sparse", [], config("sparsegpt"), "tiny")
    save_sparsified(results["sparsegpt"], tokenizer, root / "dense", [], config("sparsegpt"), "tiny", dense=True)
    pruned = fastprune.prune(
        tiny_decoder(heads=6, kv_heads=2, layers=3, channels=48),
        PruningConfig(criterion="magnitude_l2", target_params=0.3, ranking="global", round_to=4, reconstruct=False),
        "pydoc:calibration",
        tokenizer,
    ).model
    assert not adapter_for(pruned).is_uniform()
    per_layer = sparsify(pruned, config("wanda"), "pydoc:calibration", tokenizer)
    save_sparsified(per_layer, tokenizer, root / "per_layer", [], config("wanda"), "tiny")
    remote = _remote_logits([root / "sparse", root / "per_layer"], IDS)
    return root, per_layer, remote


def _remote_logits(paths, ids) -> list[torch.Tensor]:
    """Logits from AutoModelForCausalLM(trust_remote_code=True) in a process where fastprune cannot be imported."""
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["fastprune"] = None  # any import of fastprune now fails
        import torch
        from transformers import AutoModelForCausalLM
        ids = torch.tensor({ids.tolist()})
        for path in {[str(p) for p in paths]}:
            model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
            with torch.no_grad():
                torch.save(model(ids).logits, path + "/remote_logits.pt")
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, cwd=paths[0].parent)
    return [torch.load(p / "remote_logits.pt") for p in paths]


def test_saved_sparse_model_reloads_three_ways(results, saved):
    root, _, remote = saved
    result = results["sparsegpt"]
    with torch.no_grad():
        expected = result.model(IDS).logits
        reference = masked_dense(result.model)(IDS).logits
        # 1. fastprune.load: the same 2:4 layers on the kernels.
        loaded = fastprune.load(root / "sparse")
        assert sorted(sparse_layers(loaded)) == sorted(result.modules)
        assert torch.equal(loaded(IDS).logits, expected)
        # 3. --save-dense: a plain checkpoint with the masked weights.
        plain = AutoModelForCausalLM.from_pretrained(root / "dense")
        assert not hasattr(plain.config, "sparse24_modules") and not getattr(plain.config, "auto_map", None)
        for name, m in sparse_layers(result.model).items():
            assert torch.equal(plain.get_submodule(name).weight, m.dense_weight()), name
        torch.testing.assert_close(plain(IDS).logits, reference, atol=1e-4, rtol=1e-4)
    # 2. trust_remote_code, without fastprune installed.
    torch.testing.assert_close(remote[0], reference, atol=1e-4, rtol=1e-4)
    info = json.loads((root / "sparse" / "fastprune.json").read_text())
    assert info["sparsity"]["criterion"] == "sparsegpt" and len(info["sparsity"]["layers"]) == 21
    # 2:4 stores half the block weights plus 1/8 byte per weight of positions.
    assert os.path.getsize(root / "sparse" / "model.safetensors") < os.path.getsize(
        root / "dense" / "model.safetensors"
    )


def test_structured_pruned_model_with_per_layer_widths_sparsifies_and_reloads(saved):
    root, result, remote = saved
    with torch.no_grad():
        assert torch.equal(fastprune.load(root / "per_layer")(IDS).logits, result.model(IDS).logits)
        reference = masked_dense(result.model)(IDS).logits
    torch.testing.assert_close(remote[1], reference, atol=1e-4, rtol=1e-4)


def test_faster_products_are_picked_per_shape(results, monkeypatch):
    """Every layer of a shape follows the one decision taken for that shape; dense-run layers give the masked
    dense model's logits; the timing itself leaves a layer on the 2:4 kernel."""
    from fastprune.sparsity import modules

    model = copy.deepcopy(results["wanda"].model)
    layers = sparse_layers(model)
    shapes = {(m.out_features, m.in_features) for m in layers.values()}
    assert len(shapes) > 1
    timed = []
    monkeypatch.setattr(
        modules,
        "_dense_is_faster",
        lambda layer, rounds, calls: timed.append(layer) or (layer.out_features, layer.in_features) == min(shapes),
    )
    picked = modules.pick_faster_products(model)
    assert len(timed) == len(shapes)  # one measurement per shape
    assert sorted(picked) == sorted(n for n, m in layers.items() if (m.out_features, m.in_features) == min(shapes))
    assert all(m.runs_dense == (n in picked) for n, m in layers.items())
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, masked_dense(model)(IDS).logits, atol=1e-5, rtol=1e-5)
    layer = next(iter(layers.values()))
    monkeypatch.undo()
    layer.run_dense()
    modules._dense_is_faster(layer, 2, 2)
    assert not layer.runs_dense


def test_pruning_a_sparse_model_is_refused(results):
    with pytest.raises(ConfigError, match="2:4-sparse; prune the dense model first"):
        fastprune.prune(results["magnitude"].model, PruningConfig(channel_ratio=0.25))
