"""CNN path: every pruned architecture equals the original with the same channels masked to zero; groups, criteria,
costs and plans against direct computations; save/load; the command line and its bad inputs."""

import copy
import json

import pytest
import torch
from cnn_models import (
    VGG,
    BasicBlock,
    DenseInception,
    MaskedRun,
    MobileNetV2,
    ResNet,
    random_cnn,
    randomize_bn,
)
from torch import nn

from fastprune.cli import main
from fastprune.cnn import CnnPlan, CnnPruningConfig, load_cnn, prune_cnn
from fastprune.cnn.costs import CostModel
from fastprune.cnn.criteria import BnSparsity, score_units
from fastprune.cnn.graph import analyze
from fastprune.cnn.planning import make_cnn_plan
from fastprune.cnn.surgery import apply_keep
from fastprune.errors import PlanError, UnsupportedModelError

ARCHITECTURES = {
    "resnet_basic": lambda: ResNet(),
    "resnet_bottleneck": lambda: ResNet(widths=(8, 16), bottleneck=True),
    "resnext_se": lambda: ResNet(widths=(8, 16), bottleneck=True, groups=4, se=True),
    "mobilenetv2": lambda: MobileNetV2(),
    "mobilenetv3ish_se": lambda: MobileNetV2(se=True),
    "vgg_bn": lambda: VGG(),
    "inception_dense_concat": lambda: DenseInception(),
}


def check_exact(model: nn.Module, keep_fraction: float, seed: int, size: int = 20):
    model = randomize_bn(model, seed)
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(seed))
    graph = analyze(model, x[:1])
    keep = torch.rand(graph.num_units, generator=torch.Generator().manual_seed(seed)) < keep_fraction
    for g in graph.groups:  # a group keeps at least one unit
        keep[g.units[seed % len(g.units)]] = True
    pruned = copy.deepcopy(model)
    apply_keep(pruned, graph, keep)
    with torch.no_grad():
        expected, got = MaskedRun(graph, keep).run(x), pruned(x)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert sum(p.numel() for p in pruned.parameters()) == CostModel(model, graph).params(keep)
    assert not torch.allclose(got, model(x), atol=1e-3), "nothing was removed"
    return graph, pruned


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_pruned_equals_masked(name, seed):
    check_exact(ARCHITECTURES[name](), 0.5 + 0.2 * seed, seed)


@pytest.mark.parametrize("seed", range(8))
def test_random_architectures_prune_exactly(seed):
    """Stacks of grouped convs, SE blocks, inverted residuals and residual blocks that no test names."""
    check_exact(random_cnn(seed), 0.6, seed, size=17)


def test_groups_of_a_residual_network():
    graph = analyze(ResNet(widths=(8, 16)), torch.zeros(1, 3, 16, 16))
    by_name = {g.name: g for g in graph.groups}
    stage1 = by_name["stem.0"]  # the stem's output is the residual stream of stage 1: both blocks add into it
    assert len(stage1.units) == 8
    for m in ("layers.0.conv2", "layers.1.conv2", "layers.2.conv1", "layers.2.down.0", "layers.0.bn2"):
        assert m in stage1.modules
    stage2 = by_name["layers.2.conv2"]
    assert "layers.2.down.0" in stage2.modules and "layers.3.conv2" in stage2.modules and "fc" in stage2.modules
    assert len(by_name["layers.0.conv1"].units) == 8 and by_name["layers.0.conv1"].modules[-1] == "layers.0.conv2"
    # every channel, plus the image's 3 and the 10 logits, is one unit; only those 13 are frozen
    assert graph.num_units == 8 + 8 + 8 + 16 + 16 + 16 + 3 + 10 and int(graph.frozen.sum()) == 13
    assert graph.unknown == []


def test_grouped_and_depthwise_convs_tie_whole_groups():
    graph = analyze(ResNet(widths=(8,), bottleneck=True, groups=4), torch.zeros(1, 3, 16, 16))
    sites = graph.site_map()
    grouped_in = sites[("layers.0.conv2.0", "in")].units  # 8 channels in 4 groups of 2
    grouped_out = sites[("layers.0.conv2.0", "out")].units
    assert len(set(grouped_in)) == 4 and grouped_in[0] == grouped_in[1] and grouped_in[1] != grouped_in[2]
    assert grouped_out == grouped_in  # each group's inputs and outputs are one unit
    dw = analyze(MobileNetV2(), torch.zeros(1, 3, 16, 16)).site_map()
    assert dw[("features.2.block.1.0", "in")].units == dw[("features.2.block.1.0", "out")].units


def test_flatten_into_linear_repeats_each_channel():
    graph = analyze(VGG(widths=(6, "M", 5)), torch.zeros(1, 3, 8, 8))
    units = graph.site_map()[("classifier.0", "in")].units
    assert len(units) == 20 and len(set(units)) == 5 and units[:4] == [units[0]] * 4


class GroupNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.gn, self.b, self.c = nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.b(self.gn(self.a(x)))
        first, second = y.chunk(2, dim=1)  # a split of the channels: not understood, so kept
        return self.c(torch.cat([second, first], 1)).mean((2, 3))


def test_operations_not_understood_keep_their_channels_and_are_listed():
    model = GroupNormNet()
    graph = analyze(model, torch.zeros(1, 3, 9, 9))
    assert any("GroupNorm" in u for u in graph.unknown) and any("chunk" in u for u in graph.unknown)
    assert bool(graph.frozen[graph.site_map()[("a", "out")].units].all())
    assert bool(graph.frozen[graph.site_map()[("b", "out")].units].all())
    from fastprune.cnn.evaluation import CnnEvalConfig

    config = CnnPruningConfig(filter_ratio=0.5, round_to=1, input_size=(3, 9, 9))
    result = prune_cnn(model, config, evaluation=CnnEvalConfig((3, 9, 9), (1,), 1))
    x = torch.randn(2, 3, 9, 9)
    torch.testing.assert_close(result.model(x), model(x))  # nothing prunable: same model
    assert result.plan.info["not_understood"] == graph.unknown
    report = result.report.files()["report.md"]
    assert "Operations not understood" in report and all(u in report for u in graph.unknown)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3)
        self.gate = Gate()

    def forward(self, x):
        return self.gate(self.stem(x))


class Gate(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


def test_untraceable_and_non_image_models_give_one_clear_error():
    with pytest.raises(UnsupportedModelError, match="module 'gate'"):
        analyze(Untraceable(), torch.zeros(1, 3, 8, 8))
    with pytest.raises(UnsupportedModelError, match="no convolution"):
        analyze(nn.Sequential(nn.Linear(4, 4)), torch.zeros(1, 4))
    with pytest.raises(UnsupportedModelError, match="does not run on an input of shape"):
        analyze(nn.Sequential(nn.Conv2d(1, 4, 3)), torch.zeros(1, 3, 8, 8))


def test_criteria_against_direct_computations():
    torch.manual_seed(0)
    model = randomize_bn(ResNet(widths=(8, 16)), 3)
    graph = analyze(model, torch.zeros(1, 3, 12, 12))
    sites = graph.site_map()
    u = sites[("layers.0.conv1", "out")].units
    w = model.layers[0].conv1.weight.detach().double().flatten(1)
    torch.testing.assert_close(score_units(model, graph, "l1")[u], w.abs().sum(1))
    torch.testing.assert_close(score_units(model, graph, "l2")[u], w.pow(2).sum(1).sqrt())
    torch.testing.assert_close(score_units(model, graph, "fpgm")[u], torch.cdist(w, w).sum(1))
    torch.testing.assert_close(
        score_units(model, graph, "slimming")[u], model.layers[0].bn1.weight.detach().double().abs()
    )
    # the stem's group is stage 1's residual stream: l1 sums the filters of every conv that writes into it
    stem = sites[("stem.0", "out")].units
    writers = (model.stem[0], model.layers[0].conv2, model.layers[1].conv2)
    expected = sum(m.weight.detach().double().flatten(1).abs().sum(1) for m in writers)
    torch.testing.assert_close(score_units(model, graph, "l1")[stem], expected)
    # taylor: per batch, (sum over positions of activation x gradient at conv2's input)^2, averaged
    batches = [
        (torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(i)), torch.tensor([0, 1, 2, 3]))
        for i in range(2)
    ]
    expected = torch.zeros(8, dtype=torch.float64)
    acts = {}
    for images, labels in batches:
        handle = model.layers[0].conv2.register_forward_pre_hook(lambda m, a: acts.update(a=a[0]))
        out = model(images)
        handle.remove()
        (g,) = torch.autograd.grad(nn.functional.cross_entropy(out, labels), acts["a"])
        expected += (acts["a"] * g).sum((0, 2, 3)).double().pow(2)
    torch.testing.assert_close(score_units(model, graph, "taylor", batches)[u], expected / 2, rtol=1e-4, atol=1e-12)
    assert (
        score_units(model, graph, "random", seed=1)[u].tolist()
        != score_units(model, graph, "random", seed=2)[u].tolist()
    )
    assert score_units(model, graph, "l1")[graph.frozen].isnan().all()


def test_bn_sparsity_step_adds_the_l1_subgradient():
    model = ResNet(widths=(8,))
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    before = model.stem[1].weight.grad.clone()
    BnSparsity(model, 0.01).step()
    torch.testing.assert_close(model.stem[1].weight.grad, before + 0.01 * torch.sign(model.stem[1].weight))


def test_planner_ratios_targets_protections_and_rounding():
    model = randomize_bn(ResNet(widths=(16, 32), bottleneck=True), 0)
    graph = analyze(model, torch.zeros(1, 3, 16, 16))
    costs = CostModel(model, graph)
    scores = score_units(model, graph, "l1")
    plan = make_cnn_plan(graph, scores, CnnPruningConfig(filter_ratio=0.5, input_size=(3, 16, 16)), costs)
    for g in graph.groups:
        removed = plan.removed.get(g.name, [])
        if not graph.frozen[g.units].all():
            assert len(removed) == len(g.units) // 2 and (len(g.units) - len(removed)) % 8 == 0
            kept_scores = [float(scores[g.units[i]]) for i in range(len(g.units)) if i not in removed]
            assert max(float(scores[g.units[i]]) for i in removed) <= min(kept_scores)  # lowest scores go
    for target in ("target_flops", "target_params"):
        config = CnnPruningConfig(round_to=1, input_size=(3, 16, 16), **{target: 0.4})
        plan = make_cnn_plan(graph, scores, config, costs)
        key = "removed_macs_fraction" if target == "target_flops" else "removed_params_fraction"
        assert 0.4 <= plan.info[key] < 0.45
    protected = make_cnn_plan(graph, scores, CnnPruningConfig(filter_ratio=0.5, protect=("fc",)), costs)
    assert "layers.2.conv3.0" not in protected.removed and "layers.0.conv1.0" in protected.removed
    with pytest.raises(PlanError, match="removes all of them"):
        make_cnn_plan(graph, scores, CnnPruningConfig(filter_ratio=0.97, round_to=1), costs)
    with pytest.raises(PlanError, match="cannot be met"):
        make_cnn_plan(graph, scores, CnnPruningConfig(target_flops=0.999), costs)
    again = CnnPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert torch.equal(again.keep_mask(graph), plan.keep_mask(graph))
    other = analyze(ResNet(widths=(8, 32), bottleneck=True), torch.zeros(1, 3, 16, 16))
    with pytest.raises(PlanError, match="other channel groups"):
        plan.keep_mask(other)


def test_prune_saves_and_loads_back(tmp_path):
    from fastprune.cnn.pipeline import save_cnn_result

    model = randomize_bn(
        nn.Sequential(BasicBlock(3, 8), BasicBlock(8, 16, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5)),
        0,
    )
    config = CnnPruningConfig(criterion="fpgm", filter_ratio=0.5, input_size=(3, 12, 12))
    result = prune_cnn(model, config)
    out = save_cnn_result(result, tmp_path / "out", "test", config)
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        expected = result.model(x)
        torch.testing.assert_close(load_cnn(out)(x), expected)  # torch.export program, no code
        torch.testing.assert_close(load_cnn(out, trust_pickle=True)(x), expected)
    assert json.loads((out / "plan.json").read_text())["fastprune_cnn_plan"] == 1
    assert model[0].conv1.out_channels == 8  # the input model is untouched


def run_cli(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_prunes_a_saved_module_and_refuses_bad_input(tmp_path, capsys):
    model = randomize_bn(ResNet(widths=(8, 16), bottleneck=True, se=True), 1)
    torch.save(model, tmp_path / "cnn.pt")
    common = ["prune", "--model", str(tmp_path / "cnn.pt"), "--input-size", "3,16,16", "--rounds", "1"]
    out = tmp_path / "out"
    code, stdout, err = run_cli(
        common
        + ["--target-flops", "0.3", "--criterion", "taylor", "--round-to", "4", "--compare", "l2", "--out", str(out)],
        capsys,
    )
    assert code == 0, err
    assert {"plan.json", "fastprune.json", "report.md", "model.safetensors", "architecture.json"} <= {
        p.name for p in out.iterdir()
    }
    report = json.loads((out / "report.json").read_text())
    assert [r["name"] for r in report["rows"]] == ["dense", "pruned (taylor)", "pruned (l2)"]
    assert report["rows"][1]["macs"] <= 0.7 * report["rows"][0]["macs"]
    # an unlabelled image folder calibrates taylor with the model's own predictions
    from PIL import Image

    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    for i, size in enumerate([(20, 30), (16, 16), (40, 24)]):
        pixels = torch.randint(0, 255, (*size, 3), generator=torch.Generator().manual_seed(i), dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(images / ("sub" if i else "") / f"{i}.png")
    folder_out = tmp_path / "folder"
    code, stdout, err = run_cli(
        common
        + [
            "--calibration",
            str(images),
            "--criterion",
            "taylor",
            "--filter-ratio",
            "0.5",
            "--round-to",
            "1",
            "--no-eval",
            "--out",
            str(folder_out),
        ],
        capsys,
    )
    assert code == 0, err
    calibration = json.loads((folder_out / "fastprune.json").read_text())["calibration"]
    assert calibration == {"source": str(images.resolve()), "images": 3, "labelled": False}
    # the saved plan applied again gives the same model
    again = tmp_path / "again"
    assert run_cli(common + ["--plan", str(out / "plan.json"), "--no-eval", "--out", str(again)], capsys)[0] == 0
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(load_cnn(again, trust_pickle=True)(x), load_cnn(out, trust_pickle=True)(x))

    torch.save(Untraceable(), tmp_path / "untraceable.pt")
    torch.save(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), tmp_path / "mlp.pt")
    bad = [
        (common + ["--filter-ratio", "0.99", "--round-to", "1"], "removes all of them"),
        (["prune", "--model", str(tmp_path / "untraceable.pt"), "--filter-ratio", "0.5"], "module 'gate'"),
        (["prune", "--model", str(tmp_path / "mlp.pt"), "--filter-ratio", "0.5"], "no convolution"),
        (common + ["--filter-ratio", "1.0"], "filter_ratio must be in"),
        (common, "say what to remove"),
    ]
    for args, message in bad:
        target = tmp_path / "bad"
        code, _, err = run_cli(args + ["--out", str(target)], capsys)
        assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, err
        assert not target.exists()


def test_recalibrate_bn_gives_the_statistics_of_the_calibration_images():
    from fastprune.cnn.data import ImageSet
    from fastprune.cnn.recovery import recalibrate_bn

    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU()), 0)
    images = torch.randn(10, 3, 7, 7, generator=torch.Generator().manual_seed(0))
    recalibrate_bn(model, ImageSet(images, None, "test"), batch_size=4)  # batches of 4, 4 and 2
    with torch.no_grad():
        y = model[0](images)
    batches = [y[:4], y[4:8], y[8:]]
    # a cumulative average of each batch's mean and unbiased variance
    torch.testing.assert_close(model[1].running_mean, sum(b.mean((0, 2, 3)) for b in batches) / 3)
    torch.testing.assert_close(model[1].running_var, sum(b.var((0, 2, 3)) for b in batches) / 3)
    assert not model.training and model[1].momentum == 0.1
