"""Pruning one decoder layer at a time: sequential calibration, models larger than memory, many processes.

- ``driver``: the two passes (score every layer, then refit and cut every layer) over a holder of the layers.
- ``memory``: the driver on a model in memory (``PruningConfig(sequential=True)``, layer-local criteria).
- ``stream``: the driver on a model read layer by layer from its safetensors files and written shard by shard,
  alone or as one of several torch.distributed processes.
"""

from fastprune.layerwise.memory import cut_sequentially, score_layerwise
from fastprune.layerwise.stats import LAYER_LOCAL_CRITERIA

__all__ = ["LAYER_LOCAL_CRITERIA", "cut_sequentially", "score_layerwise"]
