"""Saving and reloading pruned models: atomic output, safe locations, plain and remote-code reloads, provenance."""

import json
import os

import pytest
import torch
from tinymodels import random_plan, tiny_bert, tiny_decoder, token_batch
from transformers import AutoModel, AutoModelForCausalLM

import fastprune
from fastprune.adapters import adapter_for
from fastprune.config import CalibrationConfig, PruningConfig
from fastprune.errors import OutputError
from fastprune.io import check_output_dir, save_model
from fastprune.planning import LayerCut, Plan
from fastprune.surgery import apply_plan


def _pruned(model, plan):
    apply_plan(adapter_for(model), plan)
    return model


def test_uniform_pruning_reloads_with_plain_from_pretrained(tmp_path, tokenizer):
    model = tiny_decoder(heads=6, kv_heads=2)
    shape = adapter_for(model).shape()
    plan = Plan(shape, {i: LayerCut(heads=[1, 5], channels=[0, 7, 9, 30]) for i in (0, 1, 3)}, [2])
    pruned = _pruned(model, plan)
    save_model(pruned, tokenizer, tmp_path / "out", {})
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(reloaded).__name__ == "LlamaForCausalLM"
    ids = token_batch()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, pruned(ids).logits)


@pytest.mark.parametrize("seed", [0, 1])
def test_per_layer_widths_reload_with_fastprune_and_remote_code(tmp_path, tokenizer, seed):
    model = tiny_decoder("qwen2", heads=6, kv_heads=3, seed=seed)
    pruned = _pruned(model, random_plan(adapter_for(model).shape(), seed, drop=1))
    out = save_model(pruned, tokenizer, tmp_path / "out", {})
    assert (out / "modeling_fastprune.py").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_fastprune.FastpruneQwen2ForCausalLM"
    ids = token_batch()
    with torch.no_grad():
        expected = pruned(ids).logits
        assert torch.equal(fastprune.load(out)(ids).logits, expected)
        remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
        assert torch.equal(remote(ids).logits, expected)


def test_bert_head_pruning_reloads_with_remote_code(tmp_path, tokenizer):
    model = tiny_bert(heads=4)
    shape = adapter_for(model).shape()
    pruned = _pruned(model, Plan(shape, {i: LayerCut(heads=[i], kv_heads=[i], channels=[1, 2]) for i in range(3)}))
    out = save_model(pruned, tokenizer, tmp_path / "bert", {})
    ids = token_batch()
    with torch.no_grad():
        expected = pruned(ids).last_hidden_state
        torch.testing.assert_close(fastprune.load(out)(ids).last_hidden_state, expected, rtol=0, atol=0)
        remote = AutoModel.from_pretrained(out, trust_remote_code=True)
        torch.testing.assert_close(remote(ids).last_hidden_state, expected, rtol=0, atol=0)


def test_interrupted_save_leaves_nothing(tmp_path, tokenizer, monkeypatch):
    model = tiny_decoder()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tokenizer, "save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_model(model, tokenizer, tmp_path / "out", {})
    assert os.listdir(tmp_path) == []


def test_overwrite_replaces_only_when_asked(tmp_path, tokenizer):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    model = tiny_decoder()
    with pytest.raises(OutputError, match="already exists"):
        save_model(model, tokenizer, out, {})
    assert (out / "old.txt").exists()
    save_model(model, tokenizer, out, {"new.txt": "new"}, overwrite=True)
    assert not (out / "old.txt").exists() and (out / "new.txt").read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_output_inside_or_around_the_input_is_refused(tmp_path):
    src = tmp_path / "model"
    src.mkdir()
    for bad in (src, src / "pruned", tmp_path):
        with pytest.raises(OutputError, match="input model"):
            check_output_dir(bad, [src], overwrite=True)


def test_saved_output_records_how_it_was_made(tmp_path, tokenizer):
    model = tiny_decoder(heads=6, kv_heads=2)
    config = PruningConfig(
        criterion="taylor",
        target_params=0.2,
        seed=3,
        calibration=CalibrationConfig(num_samples=2, seq_len=64),
    )
    result = fastprune.prune(model, config, "pydoc:calibration", tokenizer=tokenizer)
    out = fastprune.save_result(result, tokenizer, tmp_path / "out", [], config, "tiny")
    info = json.loads((out / "fastprune.json").read_text())
    assert info["fastprune_version"] == fastprune.__version__
    assert info["criterion"] == "taylor" and info["seed"] == 3 and info["config"]["target_params"] == 0.2
    assert len(info["calibration"]["sha256"]) == 64 and info["calibration"]["windows"] == 2
    assert info["calibration"]["text_tokens"] > 1000
    assert Plan.load(out / "plan.json").to_dict() == result.plan.to_dict()
    # the input model is untouched
    assert adapter_for(model).shape().layers[0].heads == 6
