"""Planner: ratios, GQA legality, protections, rounding, parameter targets, and plans as reviewable JSON."""

import json

import pytest
import torch

from fastprune.adapters.base import LayerShape, ModelShape, ParamCosts
from fastprune.config import PruningConfig
from fastprune.errors import ConfigError, PlanError, ScoreError
from fastprune.planning import LayerCut, Plan, make_plan
from fastprune.scoring.scores import Scores

SMOL = ModelShape("llama", 576, 64, tuple(LayerShape(9, 3, 1536) for _ in range(30)))
SMOL_COSTS = ParamCosts(head=73728, kv_head=73728, channel=1728, layer_fixed=1152, outside_layers=576)


def random_scores(shape: ModelShape, seed: int = 0) -> Scores:
    g = torch.Generator().manual_seed(seed)
    return Scores(
        "taylor",
        shape,
        heads=[torch.rand(s.heads, generator=g, dtype=torch.float64) for s in shape.layers],
        kv_heads=[torch.rand(s.kv_heads, generator=g, dtype=torch.float64) for s in shape.layers],
        channels=[torch.rand(s.channels, generator=g, dtype=torch.float64) for s in shape.layers],
        layers=torch.rand(shape.num_layers, generator=g, dtype=torch.float64),
    )


def plan(**kw) -> Plan:
    scores = kw.pop("scores", None) or random_scores(SMOL)
    return make_plan(scores, PruningConfig(**kw), SMOL_COSTS)


def test_per_layer_query_heads_removed_evenly_within_groups():
    p = plan(head_ratio=1 / 3, ranking="per_layer")
    for i in range(30):
        heads, kv, _ = p.kept(i)
        assert len(heads) == 6 and len(kv) == 3
        assert sorted(h // 3 for h in heads) == [0, 0, 1, 1, 2, 2]


def test_kv_group_mode_removes_whole_groups_and_their_heads():
    p = plan(head_ratio=1 / 3, ranking="per_layer", gqa="kv_groups")
    for i in range(30):
        cut = p.cut(i)
        assert len(cut.kv_heads) == 1
        assert cut.heads == [cut.kv_heads[0] * 3 + j for j in range(3)]


def test_global_ranking_removes_lowest_scores_first():
    scores = random_scores(SMOL)
    p = plan(scores=scores, channel_ratio=0.25, round_to=1, ranking="global")
    removed = torch.cat([scores.channels[i][p.cut(i).channels] for i in range(30)])
    kept = torch.cat([scores.channels[i][p.kept(i)[2]] for i in range(30)])
    assert removed.numel() == round(0.25 * 30 * 1536)
    assert removed.max() <= kept.min()


def test_illegal_gqa_ratio_is_refused_with_nearest_legal_ratios():
    with pytest.raises(PlanError, match=r"nearest legal ratios: 0\.2444 \(66 heads\) or 0\.2556 \(69 heads\)"):
        plan(head_ratio=0.25, ranking="global")
    with pytest.raises(PlanError, match=r"layer 0.*nearest legal ratios: 0\.0000 \(0 heads\) or 0\.3333"):
        plan(head_ratio=0.25, ranking="per_layer")


def test_kept_widths_are_multiples_of_round_to():
    for ranking in ("global", "per_layer"):
        p = plan(channel_ratio=0.3, ranking=ranking, round_to=8)
        widths = [len(p.kept(i)[2]) for i in range(30)]
        assert all(w % 8 == 0 and w >= 8 for w in widths)
        assert abs(sum(30 * 1536 - w for w in [sum(widths)]) - 0.3 * 30 * 1536) <= 8


def test_protected_layers_are_untouched_and_min_heads_respected():
    p = plan(
        head_ratio=0.2,
        gqa="kv_groups",
        protect_first=2,
        protect_last=3,
        min_heads=6,
        channel_ratio=0.2,
        ranking="global",
    )
    for i in (0, 1, 27, 28, 29):
        assert p.cut(i).is_empty()
    for i in range(2, 27):
        assert len(p.kept(i)[0]) >= 6


def test_too_much_under_protections_is_refused():
    with pytest.raises(PlanError, match="only"):
        plan(head_ratio=0.6, gqa="kv_groups", protect_first=10, protect_last=10, ranking="global")
    with pytest.raises(PlanError, match="protect every one"):
        plan(channel_ratio=0.1, protect_first=15, protect_last=15)


def test_layer_ratio_drops_lowest_scoring_layers():
    scores = random_scores(SMOL)
    p = plan(scores=scores, layer_ratio=0.2, protect_last=1)
    assert len(p.drop_layers) == 6 and 29 not in p.drop_layers
    dropped = scores.layers[p.drop_layers]
    kept = scores.layers[[i for i in range(29) if i not in p.drop_layers]]
    assert dropped.max() <= kept.min()


TOTAL = sum(9 * 73728 + 3 * 73728 + 1536 * 1728 + 1152 for _ in range(30)) + 576


@pytest.mark.parametrize("ranking", ["global", "per_layer"])
@pytest.mark.parametrize("target", [0.1, 0.25, 0.4])
def test_parameter_target_is_met_closely(target, ranking):
    p = plan(target_params=target, ranking=ranking)
    removed = p.removed_params(SMOL_COSTS)
    largest_step = 3 * 73728 * (30 if ranking == "per_layer" else 1)
    assert target * TOTAL <= removed <= target * TOTAL + largest_step
    widths = {len(p.kept(i)[2]) for i in range(30)}
    assert all(w % 8 == 0 for w in widths)
    if ranking == "per_layer":
        assert len(widths) == 1 and len({len(p.kept(i)[0]) for i in range(30)}) == 1


def test_parameter_target_takes_the_cheapest_units_per_parameter():
    scores = random_scores(SMOL)
    scores.heads = [torch.full((9,), 1e-6, dtype=torch.float64) for _ in range(30)]  # heads nearly free to remove
    p = plan(scores=scores, target_params=0.1)
    assert p.counts()["channels"] == 0 and p.counts()["heads"] > 0
    scores.heads = [torch.full((9,), 1e6, dtype=torch.float64) for _ in range(30)]  # heads precious
    p = plan(scores=scores, target_params=0.1)
    assert p.counts()["heads"] == 0 and p.counts()["channels"] > 0


CHANNEL_STEP = 8 * 1728 * 30  # a uniform step of 8 channels in every layer


def _heads_at_the_budget_edge(channel_scores: torch.Tensor) -> Scores:
    """Scores whose uniform head step (3 heads in 30 layers, 6.2% of the parameters) comes, by score per
    parameter, after the channels of about 9% of the parameters: a 10% target crosses the budget with it."""
    scores = random_scores(SMOL)
    scores.channels = [channel_scores.clone() for _ in range(30)]
    scores.heads = [torch.full((9,), 5.2, dtype=torch.float64) for _ in range(30)]
    return scores


def test_a_step_that_overshoots_the_target_is_left_when_going_on_removes_less():
    # Channel scores keep rising slowly: more channels instead of the head step remove less score.
    p = plan(scores=_heads_at_the_budget_edge(torch.linspace(0, 1, 1536, dtype=torch.float64)), target_params=0.1)
    assert p.counts()["heads"] == 0
    assert 0.1 * TOTAL <= p.removed_params(SMOL_COSTS) < 0.1 * TOTAL + CHANNEL_STEP


def test_a_step_that_overshoots_the_target_gives_back_the_steps_it_made_unnecessary():
    # Past the first 184 channels every channel is precious: the head step stays and channels go back.
    channels = torch.linspace(0, 1, 1536, dtype=torch.float64)
    channels[184:] = 100.0
    p = plan(scores=_heads_at_the_budget_edge(channels), target_params=0.1)
    assert p.counts()["heads"] == 90 and p.counts()["channels"] < 184 * 30
    assert 0.1 * TOTAL <= p.removed_params(SMOL_COSTS) < 0.1 * TOTAL + CHANNEL_STEP


def test_parameter_target_by_depth_drops_lowest_layers():
    scores = random_scores(SMOL)
    p = plan(scores=scores, target_params=0.2, granularities=("layers",))
    # six layers are 19.99% of the non-embedding parameters (the final norm counts too), so it takes seven
    assert len(p.drop_layers) == 7 and p.cuts == {}
    assert sorted(p.drop_layers) == sorted(torch.argsort(scores.layers)[:7].tolist())


def test_infeasible_parameter_target_is_refused():
    with pytest.raises(PlanError, match="cannot be met"):
        plan(target_params=0.9, granularities=("heads",))


def test_missing_scores_for_a_granularity_are_refused():
    scores = random_scores(SMOL)
    scores.layers = None
    with pytest.raises(PlanError, match="no layers scores"):
        plan(scores=scores, layer_ratio=0.1)


def test_nan_scores_are_refused():
    scores = random_scores(SMOL)
    scores.channels[3][7] = float("nan")
    with pytest.raises(ScoreError, match="NaN"):
        plan(scores=scores, channel_ratio=0.1)


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, float("nan")])
def test_ratio_out_of_range_is_refused(ratio):
    with pytest.raises(ConfigError, match=r"in \[0, 1\)"):
        PruningConfig(head_ratio=ratio)


def test_plan_round_trips_through_json(tmp_path):
    p = plan(target_params=0.25, layer_ratio=0.0)
    path = tmp_path / "plan.json"
    p.save(path)
    again = Plan.load(path)
    assert again.to_dict() == p.to_dict()
    assert json.loads(path.read_text())["cuts"]["0"].keys() == {"heads", "kv_heads", "channels"}


@pytest.mark.parametrize(
    ("cuts", "drop", "message"),
    [
        ({0: LayerCut(heads=list(range(9)), kv_heads=[0, 1, 2])}, [], "removes every head of layer 0"),
        ({0: LayerCut(channels=list(range(1536)))}, [], "every MLP channel of layer 0"),
        ({}, list(range(30)), "drops all 30 layers"),
        ({0: LayerCut(kv_heads=[1])}, [], "KV head 1 is removed but query heads"),
        ({0: LayerCut(heads=[0])}, [], "same number of query heads"),
        ({0: LayerCut(heads=[9])}, [], "index 9 out of range"),
        ({31: LayerCut(heads=[0, 3, 6])}, [], "cuts layer 31"),
        ({2: LayerCut(channels=[1])}, [2], "both dropped and cut"),
    ],
)
def test_hand_edited_bad_plans_are_refused(cuts, drop, message):
    with pytest.raises(PlanError, match=message):
        Plan(SMOL, cuts, drop)


def test_plan_for_another_model_is_refused():
    p = plan(head_ratio=1 / 3, ranking="per_layer")
    other = ModelShape("llama", 576, 64, tuple(LayerShape(9, 3, 1536) for _ in range(29)))
    with pytest.raises(PlanError, match="made for a llama model with 30 layers"):
        p.check_fits(other)
