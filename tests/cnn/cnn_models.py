"""Small CNNs in plain torch.nn (ResNet, MobileNetV2, VGG, ResNeXt, SE, DenseNet/Inception-style blocks), random
ones built from the same pieces, and the masked reference every pruned model must equal."""

from __future__ import annotations

import random

import torch
import torch.fx
from torch import nn

from fastprune.cnn.graph import ChannelGraph


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: type = nn.ReLU) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), act()
    )


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.down is None else self.down(x)
        return torch.relu(out + identity)


class Bottleneck(nn.Module):
    """ResNet-50's block, or ResNeXt's with ``groups`` > 1, optionally with squeeze-and-excitation."""

    def __init__(self, cin: int, width: int, cout: int, stride: int = 1, groups: int = 1, se: bool = False):
        super().__init__()
        self.conv1 = conv_bn(cin, width, 1)
        self.conv2 = conv_bn(width, width, 3, stride, groups)
        self.conv3 = nn.Sequential(nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.se = SqueezeExcite(cout, max(cout // 4, 2)) if se else nn.Identity()
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        identity = x if self.down is None else self.down(x)
        return self.act(self.se(self.conv3(self.conv2(self.conv1(x)))) + identity)


class SqueezeExcite(nn.Module):
    """SE with 1x1 convolutions (MobileNetV3 / EfficientNet style) or linear layers (the original paper)."""

    def __init__(self, c: int, hidden: int, linear: bool = False):
        super().__init__()
        self.linear = linear
        if linear:
            self.fc1, self.fc2 = nn.Linear(c, hidden), nn.Linear(hidden, c)
        else:
            self.fc1, self.fc2 = nn.Conv2d(c, hidden, 1), nn.Conv2d(hidden, c, 1)

    def forward(self, x):
        if self.linear:
            s = x.mean((2, 3))
            s = torch.sigmoid(self.fc2(torch.relu(self.fc1(s))))
            return x * s.view(s.size(0), s.size(1), 1, 1)
        s = nn.functional.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(s))))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int, se: bool = False):
        super().__init__()
        hidden = cin * expand
        layers = [conv_bn(cin, hidden, 1, act=nn.ReLU6)] if expand != 1 else []
        layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6)]
        if se:
            layers.append(SqueezeExcite(hidden, max(hidden // 4, 2), linear=True))
        layers += [nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.block(x) if self.residual else self.block(x)


class ResNet(nn.Module):
    def __init__(self, num_classes: int = 10, widths=(16, 32), bottleneck: bool = False, groups: int = 1, se=False):
        super().__init__()
        self.stem = conv_bn(3, widths[0])
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            if bottleneck:
                blocks += [Bottleneck(cin, w, 2 * w, stride, groups, se), Bottleneck(2 * w, w, 2 * w, 1, groups, se)]
                cin = 2 * w
            else:
                blocks += [BasicBlock(cin, w, stride), BasicBlock(w, w)]
                cin = w
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 10, se: bool = False):
        super().__init__()
        cfg = [(1, 16, 1), (4, 24, 2), (4, 24, 1), (4, 32, 2), (4, 32, 1)]
        layers, cin = [conv_bn(3, 16, 3, 2, act=nn.ReLU6)], 16
        for t, c, s in cfg:
            layers.append(InvertedResidual(cin, c, s, t, se))
            cin = c
        layers.append(conv_bn(cin, 64, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(64, num_classes))

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


class VGG(nn.Module):
    """VGG-BN: the classifier reads a flattened 2x2 map, so each channel feeds 4 inputs of the first linear layer."""

    def __init__(self, num_classes: int = 10, widths=(16, "M", 24, 24, "M", 32)):
        super().__init__()
        layers, cin = [], 3
        for w in widths:
            if w == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(cin, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
                cin = w
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(
            nn.Linear(cin * 4, 40),
            nn.ReLU(True),
            nn.Dropout(),
            nn.Linear(40, 40),
            nn.ReLU(True),
            nn.Linear(40, num_classes),
        )

    def forward(self, x):
        x = self.avgpool(self.features(x))
        return self.classifier(x.view(x.size(0), -1))


class DenseInception(nn.Module):
    """Concatenations: Inception-style branches and a DenseNet-style growing stack."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.b1 = conv_bn(16, 8, 1)
        self.b2 = nn.Sequential(conv_bn(16, 8, 1), conv_bn(8, 12, 3))
        self.b3 = nn.Sequential(nn.MaxPool2d(3, 1, 1), conv_bn(16, 4, 1))
        self.dense1 = conv_bn(24, 8)
        self.dense2 = conv_bn(32, 8)
        self.head = nn.Conv2d(40, num_classes, 1)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([self.b1(x), self.b2(x), self.b3(x)], dim=1)
        x = torch.cat([x, self.dense1(x)], 1)
        x = torch.cat((x, self.dense2(x)), 1)
        return self.head(x).mean((2, 3))


def random_cnn(seed: int, num_classes: int = 7) -> nn.Module:
    """A random stack of the pieces above with random widths (not multiples of 8), for structures no test names."""
    rng = random.Random(seed)
    c = rng.choice([6, 10, 12])
    layers: list[nn.Module] = [conv_bn(3, c, 3)]
    for _ in range(rng.randint(3, 6)):
        kind = rng.choice(["basic", "bottleneck", "resnext", "inverted", "inverted_se", "se", "plain"])
        cout = c if rng.random() < 0.5 else rng.choice([8, 12, 14, 16, 20])
        if kind == "basic":
            layers.append(BasicBlock(c, cout, rng.choice([1, 2])))
        elif kind == "bottleneck":
            layers.append(Bottleneck(c, rng.choice([5, 8]), cout))
        elif kind == "resnext":
            g = rng.choice([2, 4])
            cout = 2 * g * rng.choice([2, 3])
            layers.append(
                Bottleneck(c, g * rng.choice([2, 3]), cout, rng.choice([1, 2]), groups=g, se=rng.random() < 0.5)
            )
        elif kind in ("inverted", "inverted_se"):
            layers.append(InvertedResidual(c, cout, rng.choice([1, 2]), rng.choice([1, 3]), kind == "inverted_se"))
        elif kind == "se":
            layers.append(nn.Sequential(conv_bn(c, cout), SqueezeExcite(cout, 3, linear=rng.random() < 0.5)))
        else:
            layers.append(conv_bn(c, cout, rng.choice([1, 3])))
        c = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes))


def randomize_bn(model: nn.Module, seed: int) -> nn.Module:
    """Give every BatchNorm random statistics and affine parameters, so that masked channels are not trivially 0."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(n, generator=g))
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.5)
    return model.eval()


class MaskedRun(torch.fx.Interpreter):
    """Runs the traced original model with the removed units' channels set to zero in every tensor they appear."""

    def __init__(self, graph: ChannelGraph, keep: torch.Tensor):
        super().__init__(graph.gm)
        self.channels, self.keep = graph, keep.bool() | graph.frozen

    def run_node(self, n):
        out = super().run_node(n)
        if n.name in self.channels.tensors and isinstance(out, torch.Tensor):
            dim, units = self.channels.tensors[n.name]
            mask = self.keep[torch.tensor(units, dtype=torch.long)].to(out.dtype)
            shape = [1] * out.dim()
            shape[dim] = -1
            out = out * mask.view(shape)
        return out
