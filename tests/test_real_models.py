"""End to end on the real bundled models (SmolLM2-135M, all-MiniLM-L6-v2). Few, small, and in the default run."""

import json
import math

import pytest
import torch
from tinymodels import require_bundled
from transformers import AutoModel, AutoModelForCausalLM

import fastprune
from fastprune.cli import main

pytestmark = pytest.mark.realmodel


def test_cli_prunes_smollm2_and_the_output_reloads_with_plain_from_pretrained(tmp_path, capsys):
    require_bundled("smollm2")
    out = tmp_path / "smol"
    code = main(
        [
            "prune",
            "--samples",
            "4",
            "--seq-len",
            "128",
            "--batch-size",
            "2",
            "--channel-ratio",
            "0.25",
            "--ranking",
            "per_layer",
            "--eval-windows",
            "2",
            "--eval-text",
            "pydoc:heldout",
            "--eval-text",
            "licenses",
            "--rounds",
            "1",
            "--out",
            str(out),
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads((out / "report.json").read_text())
    dense, pruned = report["rows"]
    assert pruned["non_embedding_params"] < 0.82 * dense["non_embedding_params"]  # a quarter of the MLPs
    for text in ("pydoc:heldout", "licenses"):
        assert 1 < dense["quality"][text] < 40 and math.isfinite(pruned["quality"][text])
    plain = AutoModelForCausalLM.from_pretrained(out)
    assert plain.config.intermediate_size == 1152
    ids = torch.randint(0, plain.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, fastprune.load(out)(ids).logits, rtol=0, atol=0)
    info = json.loads((out / "fastprune.json").read_text())
    assert info["source_model"] == "smollm2" and info["calibration"]["windows"] == 4


def test_minilm_head_pruning_keeps_embeddings_close_and_reloads(tmp_path, capsys):
    require_bundled("minilm")
    out = tmp_path / "minilm"
    code = main(
        [
            "prune",
            "--model",
            "minilm",
            "--samples",
            "8",
            "--seq-len",
            "64",
            "--criterion",
            "activation",
            "--head-ratio",
            "0.25",
            "--ranking",
            "per_layer",
            "--eval-windows",
            "8",
            "--eval-seq-len",
            "64",
            "--no-latency",
            "--out",
            str(out),
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads((out / "report.json").read_text())
    assert report["quality_metric"] == "embedding cosine"
    assert 0.5 < report["rows"][1]["quality"]["pydoc:heldout"] < 1.0
    remote = AutoModel.from_pretrained(out, trust_remote_code=True)
    assert [layer.attention.self.num_attention_heads for layer in remote.encoder.layer] == [9] * 6
