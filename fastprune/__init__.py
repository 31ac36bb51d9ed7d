"""fastprune: structured pruning of transformers. Score units, plan cuts, slice weights, save, measure.

Public API::

    import fastprune
    loaded = fastprune.load_source()                      # bundled SmolLM2 (or a path / .gguf)
    config = fastprune.PruningConfig(criterion="taylor", head_ratio=1/3, channel_ratio=0.25)
    result = fastprune.prune(loaded.model, config, "pydoc:calibration", tokenizer=loaded.tokenizer,
                             evaluation=fastprune.EvalConfig())
    print(result.report.to_markdown())
    fastprune.save_result(result, loaded.tokenizer, "out/", loaded.inputs, config, loaded.name)
    model = fastprune.load("out/")
"""

__version__ = "0.1.0"

from fastprune.cnn import CnnPlan, CnnPruningConfig, load_cnn, prune_cnn
from fastprune.config import CalibrationConfig, PruningConfig
from fastprune.errors import FastpruneError
from fastprune.evaluation import EvalConfig, Report, evaluate
from fastprune.io import load
from fastprune.models import load_source
from fastprune.pipeline import PruneResult, prune, save_result
from fastprune.planning import Plan, make_plan
from fastprune.recovery import RecoveryConfig, RecoveryResult, recover
from fastprune.scoring import Scores, score

__all__ = [
    "CalibrationConfig",
    "CnnPlan",
    "CnnPruningConfig",
    "EvalConfig",
    "FastpruneError",
    "Plan",
    "PruneResult",
    "PruningConfig",
    "RecoveryConfig",
    "RecoveryResult",
    "Report",
    "Scores",
    "__version__",
    "evaluate",
    "load",
    "load_cnn",
    "load_source",
    "make_plan",
    "prune",
    "prune_cnn",
    "recover",
    "save_result",
    "score",
]
