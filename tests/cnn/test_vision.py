"""torchvision architectures (random weights): pruned equals masked, and a pruned model rebuilds from name + widths.
Run by `make test-vision` in .venv-vision; skipped where torchvision does not import (the CPU torch of .venv)."""

import copy

import pytest
import torch

try:
    import torchvision
except Exception as exc:  # RuntimeError, not ImportError, beside a torch it was not built for
    pytest.skip(f"torchvision does not import: {exc}", allow_module_level=True)

from cnn_models import MaskedRun

from fastprune.cnn import CnnPruningConfig, load_cnn, prune_cnn
from fastprune.cnn.graph import analyze
from fastprune.cnn.pipeline import save_cnn_result
from fastprune.cnn.surgery import apply_keep

pytestmark = pytest.mark.vision

ARCHITECTURES = [
    "resnet18",
    "resnet50",
    "mobilenet_v2",
    "vgg16_bn",
    "resnext50_32x4d",  # grouped convolutions
    "mobilenet_v3_small",  # squeeze-and-excitation, hardswish
    "efficientnet_b0",  # SE with SiLU, stochastic depth
    "regnet_x_400mf",  # grouped convolutions of width 16
    "densenet121",  # concatenations
    "googlenet",  # inception branches
    "shufflenet_v2_x0_5",  # channel split and shuffle: not understood, kept
]


def randomize_bn(model, seed):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_torchvision_pruned_equals_masked(name):
    torch.manual_seed(0)
    kwargs = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    model = randomize_bn(torchvision.models.get_model(name, weights=None, num_classes=10, **kwargs), 0)
    x = torch.randn(2, 3, 64, 64)
    graph = analyze(model, x[:1])
    keep = torch.rand(graph.num_units, generator=torch.Generator().manual_seed(1)) < 0.6
    for g in graph.groups:
        keep[g.units[0]] = True
    pruned = copy.deepcopy(model)
    apply_keep(pruned, graph, keep)
    with torch.no_grad():
        expected, got = MaskedRun(graph, keep).run(x), pruned(x)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    removed = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in pruned.parameters())
    assert removed > 0.1 * sum(p.numel() for p in model.parameters())
    if name == "shufflenet_v2_x0_5":
        assert graph.unknown  # listed, and their channels kept


def test_torchvision_model_rebuilds_from_name_and_widths(tmp_path):
    model = torchvision.models.resnet50(weights=None, num_classes=10).eval()
    config = CnnPruningConfig(criterion="l1", target_flops=0.3, input_size=(3, 64, 64))
    result = prune_cnn(model, config)
    out = save_cnn_result(result, tmp_path / "r50", "torchvision:resnet50:num_classes=10", config)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(load_cnn(out)(x), result.model(x))
    assert 0.3 <= result.plan.info["removed_macs_fraction"] < 0.34
