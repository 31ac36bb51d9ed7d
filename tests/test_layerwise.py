"""The layer-at-a-time driver against the whole-model code paths, and sequential calibration against direct
computations."""

import copy
import dataclasses

import pytest
import torch
from tinymodels import tiny_bert, tiny_decoder, token_batch

import fastprune
from fastprune.adapters import adapter_for
from fastprune.config import CalibrationConfig, PruningConfig
from fastprune.layerwise import score_layerwise
from fastprune.layerwise.driver import MemoryHolder, cut_layers
from fastprune.layerwise.stats import probe_seed
from fastprune.planning import LayerCut, Plan, make_plan, rechoose_layer
from fastprune.reconstruction import grams_for_plan, least_squares_weight, reconstruct
from fastprune.scoring import score
from fastprune.surgery import apply_plan

D = 8  # head_dim of the tiny decoders
LOCAL = ["magnitude_l1", "activation", "activation_frequency", "wanda", "block_influence", "obs"]


def batches(n=3, batch=2, length=23):
    return [token_batch(batch=batch, length=length, seed=s) for s in range(n)]


def sum_squares_into(total):
    """A forward pre-hook adding the squares of its input's columns over tokens into ``total``."""

    def hook(_module, args):
        total.add_(args[0].pow(2).sum((0, 1)).double())

    return hook


def assert_same_scores(a, b):
    assert a.criterion == b.criterion and a.shape == b.shape and a.info == b.info
    for kind in ("heads", "kv_heads", "channels"):
        x, y = getattr(a, kind), getattr(b, kind)
        assert (x is None) == (y is None), kind
        for s, t in zip(x or [], y or [], strict=True):
            assert torch.equal(s, t), kind
    assert (a.layers is None) == (b.layers is None)
    if a.layers is not None:
        assert torch.equal(a.layers, b.layers)


@pytest.mark.parametrize("criterion", LOCAL)
@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_layer_by_layer_scores_equal_the_whole_model_pass(criterion, kind):
    model = tiny_decoder(kind, heads=6, kv_heads=2, layers=3, channels=44, attention_bias=kind == "llama")
    adapter = adapter_for(model)
    data = batches()
    assert_same_scores(score_layerwise(adapter, data, criterion), score(adapter, data, criterion))


def test_layer_by_layer_scores_equal_the_whole_model_pass_for_an_encoder():
    model = tiny_bert(heads=4, layers=3, channels=36)
    adapter = adapter_for(model)
    data = batches(length=13)
    for criterion in ("wanda", "obs", "block_influence"):
        assert_same_scores(score_layerwise(adapter, data, criterion), score(adapter, data, criterion))


def _unit_params(layer, kind, j):
    """(parameter, index) pairs of one unit of a Llama layer, written out from the module names."""
    a, m = layer.self_attn, layer.mlp
    rows = slice(j * D, (j + 1) * D)
    if kind == "heads":
        return [(a.q_proj.weight, (rows,)), (a.q_proj.bias, (rows,)), (a.o_proj.weight, (slice(None), rows))]
    if kind == "kv_heads":
        return [(p, (rows,)) for p in (a.k_proj.weight, a.k_proj.bias, a.v_proj.weight, a.v_proj.bias)]
    return [(m.gate_proj.weight, (j,)), (m.up_proj.weight, (j,)), (m.down_proj.weight, (slice(None), j))]


def test_local_taylor_and_fisher_equal_probed_gradient_products():
    model = tiny_decoder(heads=6, kv_heads=2, layers=3, channels=20, attention_bias=True)
    data = batches(n=2)
    widths = {"heads": 6, "kv_heads": 2, "channels": 20}
    expected = {c: {k: torch.zeros(3, n, dtype=torch.float64) for k, n in widths.items()} for c in ("t", "f")}
    for b, ids in enumerate(data):
        with torch.no_grad():
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
        positions = torch.arange(ids.shape[1])[None]
        rotary = model.model.rotary_emb(hidden[0], positions)
        for i, layer in enumerate(model.model.layers):
            out = layer(hidden[i], position_embeddings=rotary, position_ids=positions, attention_mask=None)
            gen = torch.Generator().manual_seed(probe_seed(7, i, b))
            probe = torch.randn(out.shape, generator=gen)
            model.zero_grad()
            (out * probe).sum().backward()
            for kind, n in widths.items():
                for j in range(n):
                    wg = torch.cat([(p[idx] * p.grad[idx]).flatten() for p, idx in _unit_params(layer, kind, j)])
                    expected["t"][kind][i, j] += wg.abs().sum().double()
                    expected["f"][kind][i, j] += wg.pow(2).sum().double()
    model.zero_grad()
    adapter = adapter_for(model)
    for name, criterion in (("t", "taylor_local"), ("f", "fisher_local")):
        got = score_layerwise(adapter, data, criterion, seed=7)
        for kind in widths:
            torch.testing.assert_close(torch.stack(getattr(got, kind)), expected[name][kind], rtol=1e-4, atol=1e-9)
        sums = sum(expected[name][k].sum(1) for k in widths)
        torch.testing.assert_close(got.layers, sums, rtol=1e-4, atol=1e-9)
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())


def test_local_fisher_estimates_the_output_error_of_removing_a_channel():
    """E[(w*g)^2] over probes is the squared output change of removing each weight alone (first order); summed over
    a down_proj column it is ||W[:, c]||^2 * sum_t a_c(t)^2, exactly what removing channel c's output costs."""
    model = tiny_decoder(layers=1, channels=12)
    data = batches(n=40, batch=1, length=9)  # many probes
    got = score_layerwise(adapter_for(model), data, "fisher_local").channels[0]
    acts = torch.zeros(12, dtype=torch.float64)
    mlp = model.model.layers[0].mlp
    handle = mlp.down_proj.register_forward_pre_hook(sum_squares_into(acts))
    with torch.no_grad():
        for ids in data:
            model(input_ids=ids)
    handle.remove()
    w = mlp.down_proj.weight.detach().double()
    direct = w.pow(2).sum(0) * acts  # the down_proj column's own part of the channel's fisher_local
    # The channel's gate/up rows add their own (positive) terms, so fisher_local bounds the direct cost from above
    # and ranks channels like it.
    assert torch.all(got >= 0.5 * direct)
    order = torch.corrcoef(torch.stack([got.log(), direct.log()]))[0, 1]
    assert order > 0.8


def _fast(criterion="obs", **kw):
    return PruningConfig(criterion=criterion, calibration=CalibrationConfig(num_samples=12, batch_size=4), **kw)


def _ids():
    return torch.cat([token_batch(batch=4, length=40, seed=s) for s in range(3)])


def test_sequential_off_reproduces_the_plan_and_weights_of_the_whole_model_flow():
    model = tiny_decoder(heads=6, kv_heads=2, layers=4, channels=48)
    config = _fast(target_params=0.3)
    assert config.sequential is False
    result = fastprune.prune(model, config, _ids())
    # Today's flow written out: score, plan, refit from the dense Gram matrices, cut.
    adapter = adapter_for(model)
    batches_ = list(_ids().split(4))
    plan = make_plan(score(adapter, batches_, "obs"), config, adapter.param_costs())
    expected = copy.deepcopy(model)
    reconstruct(adapter_for(expected), plan, grams_for_plan(adapter, batches_, plan), config.damping)
    apply_plan(adapter_for(expected), plan)
    assert result.plan.cuts == plan.cuts and result.plan.drop_layers == plan.drop_layers
    for (name, a), b in zip(result.model.state_dict().items(), expected.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    # The layer-at-a-time driver with sequential off makes the same model.
    driven = copy.deepcopy(model)
    holder = MemoryHolder(adapter_for(driven))
    cut_layers(holder, holder.calls(batches_, [0, 1, 2]), plan, None, config)
    for a, b in zip(driven.state_dict().values(), expected.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_sequential_refit_is_the_least_squares_fit_on_the_already_cut_model():
    model = tiny_decoder(heads=6, kv_heads=2, layers=3, channels=48)
    shape = adapter_for(model).shape()
    plan = Plan(shape, {i: LayerCut(channels=list(range(i, 48, 3))) for i in range(3)})
    ids = _ids()
    seq = fastprune.prune(model, _fast(sequential=True), ids, plan=plan)
    plain = fastprune.prune(model, _fast(), ids, plan=plan)
    # Layer 0 sees the same inputs either way.
    first = [m.model.model.layers[0].mlp.down_proj.weight for m in (seq, plain)]
    torch.testing.assert_close(*first, rtol=0, atol=0)
    # Layer 1's refit: least squares on the inputs of the model whose layer 0 is cut (as sequential left it).
    partial = copy.deepcopy(model)
    partial.model.layers[0] = copy.deepcopy(seq.model.model.layers[0])
    gram = torch.zeros(48, 48, dtype=torch.float64)

    def hook(_module, args):
        x = args[0].flatten(0, 1).double()
        gram.add_(x.T @ x)

    handle = partial.model.layers[1].mlp.down_proj.register_forward_pre_hook(hook)
    with torch.no_grad():
        for b in ids.split(4):
            partial(input_ids=b)
    handle.remove()
    keep = torch.tensor(plan.kept(1)[2])
    direct = least_squares_weight(model.model.layers[1].mlp.down_proj.weight, gram, keep, 0.001)
    got = seq.model.model.layers[1].mlp.down_proj.weight
    torch.testing.assert_close(got, direct, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, plain.model.model.layers[1].mlp.down_proj.weight, rtol=1e-4, atol=1e-5)


def test_sequential_rechooses_units_on_the_cut_models_activations():
    model = tiny_decoder(heads=6, kv_heads=2, layers=4, channels=48, seed=1)
    ids = _ids()
    ratios = {"head_ratio": 1 / 3, "channel_ratio": 0.5}
    plain = fastprune.prune(model, _fast("wanda", **ratios), ids)
    seq = fastprune.prune(model, _fast("wanda", sequential=True, **ratios), ids)
    assert seq.plan.info["sequential"] == {"units_rechosen": True}
    assert seq.plan.cuts[0] == plain.plan.cuts[0]  # the first layer's inputs are the same
    for i in range(4):
        assert len(seq.plan.cuts[i].heads) == len(plain.plan.cuts[i].heads)
        assert len(seq.plan.cuts[i].channels) == len(plain.plan.cuts[i].channels)
    assert seq.plan.cuts[1].channels != plain.plan.cuts[1].channels
    # Layer 1's channels: the lowest wanda scores on the inputs of the model whose layer 0 is cut.
    partial = copy.deepcopy(model)
    partial.model.layers[0] = copy.deepcopy(seq.model.model.layers[0])
    sumsq = torch.zeros(48, dtype=torch.float64)
    down = partial.model.layers[1].mlp.down_proj
    handle = down.register_forward_pre_hook(sum_squares_into(sumsq))
    with torch.no_grad():
        for b in ids.split(4):
            partial(input_ids=b)
    handle.remove()
    wanda = down.weight.detach().double().abs().sum(0) * sumsq.sqrt()
    lowest = sorted(torch.argsort(wanda)[:24].tolist())
    assert seq.plan.cuts[1].channels == lowest


def test_sequential_with_a_whole_model_criterion_keeps_the_plan_and_refits_sequentially():
    model = tiny_decoder(heads=6, kv_heads=2, layers=3, channels=48)
    ids = _ids()
    plain = fastprune.prune(model, _fast("taylor", channel_ratio=0.25), ids)
    seq = fastprune.prune(model, _fast("taylor", channel_ratio=0.25, sequential=True), ids)
    assert seq.plan.cuts == plain.plan.cuts
    assert seq.plan.info["sequential"] == {"units_rechosen": False}
    a, b = seq.model.model.layers[2].mlp.down_proj.weight, plain.model.model.layers[2].mlp.down_proj.weight
    assert not torch.allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("gqa", ["query_heads", "kv_groups"])
@pytest.mark.parametrize("ranking", ["per_layer", "global"])
def test_rechoosing_with_the_planning_scores_gives_the_plan_back(gqa, ranking):
    model = tiny_decoder(heads=6, kv_heads=2, layers=4, channels=44)
    adapter = adapter_for(model)
    scores = score(adapter, batches(), "wanda")
    ratio = 0.5 if gqa == "kv_groups" else 1 / 3
    config = PruningConfig(criterion="wanda", head_ratio=ratio, channel_ratio=0.3, ranking=ranking, gqa=gqa)
    plan = make_plan(scores, config, adapter.param_costs())
    for i in range(4):
        assert rechoose_layer(plan, i, scores, config) == plan.cut(i)
    # Other scores: the same counts, other units.
    flipped = dataclasses.replace(scores, heads=[-t for t in scores.heads], channels=[-t for t in scores.channels])
    for i in range(4):
        cut = rechoose_layer(plan, i, flipped, config)
        assert (len(cut.heads), len(cut.kv_heads), len(cut.channels)) == tuple(
            len(x) for x in (plan.cut(i).heads, plan.cut(i).kv_heads, plan.cut(i).channels)
        )
        if plan.cut(i).channels:
            assert cut.channels != plan.cut(i).channels
