"""``fastprune sparsify`` on a tiny saved model: the whole flow, --save-dense, and bad input failing with one line."""

import json

import pytest
import torch
from tinymodels import byte_tokenizer, tiny_decoder, token_batch
from transformers import AutoModelForCausalLM

import fastprune
from fastprune.cli import main
from fastprune.ops import Sparse24Linear

FAST = ["--samples", "4", "--seq-len", "40", "--batch-size", "2"]
FAST_EVAL = ["--eval-windows", "2", "--eval-seq-len", "48", "--rounds", "1"]


def test_sparsify_writes_a_report_and_a_model_that_reloads(model_dir, tmp_path, capsys):
    out = tmp_path / "s24"
    args = ["sparsify", "--model", str(model_dir), *FAST, *FAST_EVAL, "--criterion", "sparsegpt"]
    assert main([*args, "--skip", "layers.0,lm_head", "--out", str(out)]) == 0, capsys.readouterr().err
    stdout = capsys.readouterr().out
    assert "made 21 linear layers 2:4-sparse (sparsegpt), left 7 dense" in stdout and "| 2:4 (sparsegpt) |" in stdout
    report = json.loads((out / "report.json").read_text())
    dense, sparse = report["rows"]
    assert sparse["name"] == "2:4 (sparsegpt)" and sparse["weights_mb"] < dense["weights_mb"]
    info = json.loads((out / "fastprune.json").read_text())
    assert info["sparsity"]["skipped"][:2] == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"]
    assert info["calibration"]["windows"] == 4 and info["source_model"] == str(model_dir.resolve())
    model = fastprune.load(out)
    assert isinstance(model.model.layers[1].mlp.up_proj, Sparse24Linear)
    assert isinstance(model.model.layers[0].mlp.up_proj, torch.nn.Linear)


def test_save_dense_writes_a_plain_checkpoint(model_dir, tmp_path, capsys):
    out = tmp_path / "dense"
    assert (
        main(
            [
                "sparsify",
                "--model",
                str(model_dir),
                "--criterion",
                "magnitude",
                "--no-eval",
                "--save-dense",
                "--out",
                str(out),
            ]
        )
        == 0
    ), capsys.readouterr().err
    assert not (out / "modeling_fastprune.py").exists()
    plain = AutoModelForCausalLM.from_pretrained(out)
    w = plain.model.layers[2].self_attn.o_proj.weight
    assert ((w != 0).view(w.shape[0], -1, 4).sum(-1) <= 2).all()
    original = fastprune.load(model_dir).model.layers[2].self_attn.o_proj.weight
    assert torch.equal(w[w != 0], original[w != 0])
    with torch.no_grad():
        assert torch.isfinite(plain(token_batch()).logits).all()


@pytest.fixture(scope="module")
def odd_model_dir(tmp_path_factory):
    """A tiny Llama whose MLP is 42 channels wide: down_proj's inputs do not split into groups of 4."""
    path = tmp_path_factory.mktemp("models") / "odd"
    tiny_decoder(layers=2, channels=42).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--pattern", "4:8"], "pattern must be 2:4"),
        (["--skip", "layers.9"], "skip entry 'layers.9' matches no module"),
        (["--model", "ODD"], "not divisible by 4: model.layers.0.mlp.down_proj (42)"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(model_dir, odd_model_dir, tmp_path, capsys, args, message):
    args = [str(odd_model_dir) if a == "ODD" else a for a in args]
    model = [] if "--model" in args else ["--model", str(model_dir)]
    out = tmp_path / "out"
    assert main(["-q", "sparsify", *model, *args, *FAST, "--no-eval", "--out", str(out)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last
    assert list(tmp_path.iterdir()) == []
