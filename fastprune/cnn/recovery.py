"""Cheap recovery after pruning a CNN: re-estimate BatchNorm statistics on calibration images.

Removing channels changes what every later BatchNorm sees (its convolution sums fewer inputs), while its running
mean and variance still describe the dense model; re-estimating them, with no weight trained, recovers much of the
accuracy (the "adaptive BatchNorm" of Li et al., EagleEye, ECCV 2020) and makes criteria comparable before any
fine-tuning.
"""

from __future__ import annotations

import torch
from torch import nn

from fastprune.cnn.data import ImageSet
from fastprune.errors import CalibrationError


def recalibrate_bn(model: nn.Module, images: ImageSet, batch_size: int = 64) -> nn.Module:
    """Replace every BatchNorm's running statistics by their average over ``images`` (in place; eval mode after)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return model
    if len(images.images) == 0:
        raise CalibrationError("BatchNorm recalibration needs calibration images")
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over all batches
    model.train()
    try:
        with torch.no_grad():
            for x, _ in images.batches(batch_size):
                model(x)
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.eval()
    return model
