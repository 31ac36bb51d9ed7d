"""Filter pruning of convolutional networks: coupled channel groups from the traced graph (graph.py), criteria,
an exact cost model and planner, surgery through ops.gather_slice, save/load, evaluation and a demo.

    import fastprune
    config = fastprune.CnnPruningConfig(criterion="l1", target_flops=0.3)
    result = fastprune.prune_cnn(model, config)        # result.model: a smaller plain nn.Module
"""

from fastprune.cnn.config import CnnPruningConfig
from fastprune.cnn.io import load_cnn
from fastprune.cnn.pipeline import prune_cnn
from fastprune.cnn.planning import CnnPlan

__all__ = ["CnnPlan", "CnnPruningConfig", "load_cnn", "prune_cnn"]
