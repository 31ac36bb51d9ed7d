"""fastprune analyze: the predictor fit, the curve against real prunes, and the files it writes."""

import json
import math

import pytest

from fastprune.analysis import fit_predictor, removed_score
from fastprune.cli import main
from fastprune.planning import LayerCut, Plan
from fastprune.scoring.scores import Scores


def test_predictor_passes_through_two_measurements():
    fit = fit_predictor([(2.0, 1.5), (5.0, 3.0)])
    for s, ratio in ((2.0, 1.5), (5.0, 3.0)):
        assert fit["b"] * s ** fit["p"] == pytest.approx(math.log(ratio))
    assert fit_predictor([(3.0, 2.0)]) == {"b": pytest.approx(math.log(2.0) / 3.0), "p": 1.0}


def test_removed_score_sums_what_the_plan_removes():
    import torch

    from fastprune.adapters.base import LayerShape, ModelShape

    shape = ModelShape("llama", 8, 2, (LayerShape(4, 2, 6), LayerShape(4, 2, 6)))
    scores = Scores(
        "taylor",
        shape,
        heads=[torch.arange(4.0), torch.arange(4.0)],
        kv_heads=[torch.ones(2), torch.ones(2)],
        channels=[torch.arange(6.0), 10 * torch.arange(6.0)],
        layers=torch.tensor([100.0, 200.0]),
    )
    plan = Plan(shape, {0: LayerCut(heads=[0, 1], kv_heads=[0], channels=[5])}, [1])
    assert removed_score(scores, plan) == 0 + 1 + 1 + 5 + 200


def test_cli_analyze_writes_curve_and_maps(model_dir, tmp_path, capsys):
    out = tmp_path / "analysis"
    code = main(
        [
            "analyze",
            "--model",
            str(model_dir),
            "--samples",
            "4",
            "--seq-len",
            "48",
            "--criterion",
            "taylor",
            "--ranking",
            "global",
            "--fractions",
            "0.1,0.2,0.3",
            "--check",
            "0.1,0.3",
            "--eval-windows",
            "2",
            "--no-latency",
            "--out",
            str(out),
        ]
    )
    assert code == 0, capsys.readouterr().err
    data = json.loads((out / "analysis.json").read_text())
    points = data["points"]
    assert [p["fraction"] for p in points] == [0.1, 0.2, 0.3]
    assert [p["measured_ppl"] is not None for p in points] == [True, False, True]
    assert all(a["removed_score"] <= b["removed_score"] for a, b in zip(points, points[1:], strict=False))
    for p in points:
        if p["measured_ppl"] and p["measured_ppl"] > data["dense_ppl"]:
            assert p["predicted_ppl"] == pytest.approx(p["measured_ppl"], rel=1e-6)
    assert (out / "importance.png").stat().st_size > 1000 and (out / "curve.png").stat().st_size > 1000
