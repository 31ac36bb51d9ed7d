"""fastprune: structured pruning of transformers. Score units, plan cuts, slice weights, save, measure.

Public API::

    import fastprune
    loaded = fastprune.load_source()                      # bundled SmolLM2 (or a path / .gguf)
    config = fastprune.PruningConfig(criterion="taylor", head_ratio=1/3, channel_ratio=0.25)
    result = fastprune.prune(loaded.model, config, "pydoc:calibration+stdlib-docstrings",
                             tokenizer=loaded.tokenizer, evaluation=fastprune.EvalConfig())
    print(result.report.to_markdown())
    fastprune.save_result(result, loaded.tokenizer, "out/", loaded.inputs, config, loaded.name)
    model = fastprune.load("out/")

    sparse = fastprune.sparsify(loaded.model, fastprune.SparsifyConfig(criterion="wanda"), "pydoc:calibration",
                                tokenizer=loaded.tokenizer)    # 2:4 on every block linear
    fastprune.save_sparsified(sparse, loaded.tokenizer, "out-24/", loaded.inputs, fastprune.SparsifyConfig(),
                              loaded.name)
    fastprune.export_gguf(model, loaded.tokenizer, "out.q8_0.gguf", "q8_0")
"""

__version__ = "0.1.0"

from fastprune.cnn import CnnPlan, CnnPruningConfig, load_cnn, prune_cnn
from fastprune.config import CalibrationConfig, PruningConfig
from fastprune.errors import FastpruneError
from fastprune.evaluation import EvalConfig, Report, evaluate
from fastprune.export import export_gguf
from fastprune.io import load
from fastprune.models import load_source
from fastprune.pipeline import PruneResult, prune, save_result
from fastprune.planning import Plan, make_plan
from fastprune.recovery import RecoveryConfig, RecoveryResult, recover
from fastprune.scoring import Scores, score
from fastprune.sparsity import SparsifyConfig, SparsifyResult, save_sparsified, sparsify

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
    "SparsifyConfig",
    "SparsifyResult",
    "__version__",
    "evaluate",
    "export_gguf",
    "load",
    "load_cnn",
    "load_source",
    "make_plan",
    "prune",
    "prune_cnn",
    "recover",
    "save_result",
    "save_sparsified",
    "score",
    "sparsify",
]
