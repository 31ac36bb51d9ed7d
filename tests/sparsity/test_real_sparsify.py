"""2:4 on the bundled SmolLM2, end to end: the CLI, the reload onto the kernels, and equality with the masked dense
model; GGUF export of it (slow: transformers' GGUF loader takes half a minute)."""

import json

import pytest
import torch
from tinymodels import require_bundled

import fastprune
from fastprune.cli import main
from fastprune.ops import Sparse24Linear
from fastprune.sparsity.modules import densify

pytestmark = pytest.mark.realmodel


def test_cli_sparsifies_smollm2_and_the_kernels_equal_the_masked_dense_model(tmp_path, capsys):
    require_bundled("smollm2")
    out = tmp_path / "smol-24"
    args = ["sparsify", "--criterion", "wanda", "--samples", "4", "--seq-len", "128", "--no-eval", "--out", str(out)]
    assert main(args) == 0, capsys.readouterr().err
    info = json.loads((out / "fastprune.json").read_text())
    assert len(info["sparsity"]["layers"]) == 30 * 7 and info["source_model"] == "smollm2"
    model = fastprune.load(out)
    assert sum(isinstance(m, Sparse24Linear) for m in model.modules()) == 210
    dense = densify(fastprune.load(out))
    ids = torch.randint(0, model.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sparse_logits, dense_logits = model(ids).logits, dense(ids).logits
    # fp32 within 1e-4 of the logits' scale: both products sum in fp32 in different orders, and each is about
    # 1.5e-5 of the scale away from a float64 forward pass after 30 layers.
    assert (sparse_logits - dense_logits).abs().max() <= 1e-4 * dense_logits.abs().max()


@pytest.mark.slow
def test_gguf_q8_0_of_smollm2_reloads_in_transformers_with_the_same_perplexity(tmp_path):
    from transformers import AutoModelForCausalLM

    from fastprune.data import read_text, token_windows
    from fastprune.evaluation import perplexity
    from fastprune.export import export_gguf

    require_bundled("smollm2")
    loaded = fastprune.load_source("smollm2")
    path = export_gguf(loaded.model, loaded.tokenizer, tmp_path / "smol.q8_0.gguf", "q8_0")
    gguf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    windows = token_windows(loaded.tokenizer, read_text("pydoc:heldout"), 256, 4)
    assert perplexity(gguf, windows, 4) == pytest.approx(perplexity(loaded.model, windows, 4), rel=0.02)
