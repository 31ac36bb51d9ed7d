"""2:4 semi-structured sparsity for whole models: ``sparsify(model, SparsifyConfig(...))`` swaps every block linear
for a ``Sparse24Linear`` chosen by magnitude, Wanda or SparseGPT; ``save_sparsified`` writes it."""

from fastprune.sparsity.config import PATTERNS, SPARSIFY_CRITERIA, SparsifyConfig
from fastprune.sparsity.pipeline import SparsifyResult, save_sparsified, sparsify

__all__ = ["PATTERNS", "SPARSIFY_CRITERIA", "SparsifyConfig", "SparsifyResult", "save_sparsified", "sparsify"]
