"""Per-layer amounts from measured layer sensitivity (ranking="loss_weighted")."""

import copy

import pytest
import torch
from tinymodels import tiny_decoder, train_briefly

import fastprune
from fastprune.adapters import adapter_for
from fastprune.allocation import SENSITIVITY_WINDOWS, SPREAD, bounded, layer_weights, weighted
from fastprune.config import CalibrationConfig, PruningConfig
from fastprune.data import pydoc_text, token_windows
from fastprune.errors import PlanError
from fastprune.planning import LayerCut, Plan, make_plan
from fastprune.reconstruction import collect_grams, reconstruct
from fastprune.scoring import score_for_config
from fastprune.surgery import apply_plan

SEQ = 48

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tokenizer):
    """A tiny decoder trained briefly on Python's docs (so cutting it hurts), with a louder third layer."""
    text = token_windows(tokenizer, pydoc_text("calibration"), SEQ, 96, "pydoc:calibration").ids
    torch.manual_seed(0)
    model = train_briefly(tiny_decoder(layers=4, seed=3), text[:88])
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight.mul_(3)
    batches = list(text[88:96].split(4))
    adapter = adapter_for(model)
    config = PruningConfig(criterion="obs", target_params=0.5, ranking="loss_weighted")
    layers = list(range(4))
    grams = collect_grams(adapter, batches, layers, layers)
    scores = score_for_config(adapter, batches, config, grams)
    return model, adapter, batches, config, grams, scores


def test_weights_are_the_loss_rise_of_each_layer_cut_alone_per_score_removed(setup):
    model, adapter, batches, config, grams, scores = setup
    costs = adapter.param_costs()
    uniform = make_plan(scores, PruningConfig(criterion="obs", target_params=0.5), costs)
    before = copy.deepcopy(model.state_dict())
    weights = layer_weights(adapter, uniform, scores, batches, grams, config.damping)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing left changed
    windows = torch.cat(batches)[:SENSITIVITY_WINDOWS].split(4)

    def loss(m):
        with torch.no_grad():
            return sum(float(adapter_for(m).loss(w)) for w in windows) / len(windows)

    base, rises, masses = loss(model), [], []
    for i in range(4):
        single = Plan(uniform.shape, {i: uniform.cut(i)})
        pruned = copy.deepcopy(model)  # the real thing: refit and physically cut
        reconstruct(adapter_for(pruned), single, grams, config.damping)
        apply_plan(adapter_for(pruned), single)
        cut = uniform.cut(i)
        masses.append(float(scores.heads[i][cut.heads].sum()) + float(scores.channels[i][cut.channels].sum()))
        rises.append(loss(pruned) - base)
    rises = torch.tensor(rises, dtype=torch.float64)
    # Which cuts of a tiny model raise its loss depends on the CPU's arithmetic (on an AVX-512 Xeon two of the four
    # lowered it): the ones that do not are floored at 1% of the median rise.
    assert (rises > 0).sum() >= 2  # (enough rising layers to tell them apart)
    floor = 0.01 * rises[rises > 0].median()
    ratios = rises.clamp_min(floor) / torch.tensor(masses, dtype=torch.float64)
    assert torch.allclose(weights, ratios / ratios.median(), rtol=1e-4)


def test_prune_cuts_less_where_the_loss_rises_more(setup, tokenizer):
    model, *_ = setup
    calibration = torch.cat(setup[2])  # (8 windows: SENSITIVITY_WINDOWS of them measure the rises)
    results = {}
    for ranking in ("per_layer", "global", "loss_weighted"):
        config = PruningConfig(
            criterion="obs", target_params=0.5, ranking=ranking, calibration=CalibrationConfig(8, SEQ, 4)
        )
        results[ranking] = fastprune.prune(model, config, calibration)
    lw = results["loss_weighted"].plan
    weights = lw.info["layer_weights"]
    assert len(weights) == 4 and max(weights) > 2 * min(weights)
    # The plan is the global ranking of the weighted scores, bounded around the uniform cut.
    scores, uniform = results["global"].scores, results["per_layer"].plan
    global_config = PruningConfig(criterion="obs", target_params=0.5, ranking="global")
    costs = adapter_for(model).param_costs()
    again = make_plan(bounded(weighted(scores, torch.tensor(weights)), uniform, SPREAD), global_config, costs)
    assert again.cuts == lw.cuts
    assert lw.cuts != uniform.cuts and lw.cuts != results["global"].plan.cuts
    for i in range(4):
        band = round(SPREAD * uniform.shape.layers[i].channels) + global_config.round_to  # (widths round to 8)
        assert abs(len(lw.cut(i).channels) - len(uniform.cut(i).channels)) <= band
    assert lw.info["config"]["ranking"] == "loss_weighted"


def test_bounded_scores_force_and_forbid_outside_the_band(setup):
    *_, scores = setup
    uniform = Plan(scores.shape, {0: LayerCut(channels=list(range(10)))})
    out = bounded(scores, uniform, 0.1)  # 44 channels: band 4, so 6 forced and everything past 14 forbidden
    order = scores.channels[0].argsort(stable=True)
    assert (out.channels[0][order[:6]] == 0).all()
    assert (out.channels[0][order[14:]] > 1e5 * scores.channels[0].max()).all()
    assert torch.equal(out.channels[0][order[6:14]], scores.channels[0][order[6:14]])
    assert (out.channels[1] != 0).all()  # uncut: none forced
    assert (out.channels[1][scores.channels[1].argsort(stable=True)[4:]] > 1e5 * scores.channels[1].max()).all()


def test_unweighted_scores_cannot_be_planned_loss_weighted(setup):
    _, adapter, _, config, _, scores = setup
    with pytest.raises(PlanError, match="loss_weighted"):
        make_plan(scores, config, adapter.param_costs())
