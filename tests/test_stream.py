"""Streaming (one layer at a time from safetensors files) against pruning in memory, resuming, and bad input."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tinymodels import byte_tokenizer, tiny_decoder
from transformers import AutoModelForCausalLM

import fastprune
from fastprune.cli import main
from fastprune.config import CalibrationConfig, PruningConfig
from fastprune.errors import CheckpointError, ConfigError, ModelNotFoundError
from fastprune.layerwise import stream
from fastprune.layerwise.stream import prune_streaming

CAL = CalibrationConfig(num_samples=8, seq_len=40, batch_size=2)
#: A short calibration text (the byte tokenizer makes one token per byte; tokenising all of pydoc takes seconds).
TEXT = str(Path(__file__).with_name("tinymodels.py"))
CLI_CAL = ["--samples", "8", "--seq-len", "40", "--batch-size", "2", "--calibration", TEXT]


def save_source(path, dtype=torch.float32, shards=False, **kw):
    model = tiny_decoder(**kw).to(dtype)
    model.save_pretrained(path, max_shard_size="20KB" if shards else "5GB")
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny Llama (6 heads, 2 KV heads, 48 channels, 4 layers) saved in several safetensors shards."""
    return save_source(tmp_path_factory.mktemp("stream") / "src", shards=True, channels=48)


def in_memory(source, config):
    return fastprune.prune(fastprune.load(source), config, TEXT, tokenizer=byte_tokenizer())


def assert_same_model(result, out, dtype=torch.float32, atol=0.0):
    assert (out / "plan.json").is_file()
    plan = fastprune.Plan.load(out / "plan.json")
    assert plan.cuts == result.plan.cuts and plan.drop_layers == result.plan.drop_layers
    streamed = fastprune.load(out, dtype=dtype).state_dict()
    expected = {k: v.to(dtype) for k, v in result.model.state_dict().items()}
    assert streamed.keys() == expected.keys()
    for name, t in expected.items():
        torch.testing.assert_close(streamed[name], t, rtol=0, atol=atol, msg=name)


CONFIGS = {
    "obs-target": dict(target_params=0.3),
    "obs-sequential": dict(target_params=0.3, sequential=True),
    "wanda-ratios-global": dict(criterion="wanda", head_ratio=1 / 3, channel_ratio=0.25, ranking="global"),
    "taylor_local-layers": dict(
        criterion="taylor_local", channel_ratio=0.25, layer_ratio=0.25, layer_criterion="block_influence", seed=5
    ),
    "activation-sequential-kv": dict(criterion="activation", head_ratio=0.5, gqa="kv_groups", sequential=True),
    "magnitude-no-refit": dict(criterion="magnitude_l2", channel_ratio=0.5, reconstruct=False),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_streaming_equals_pruning_in_memory(source, tmp_path, name):
    config = PruningConfig(calibration=CAL, **CONFIGS[name])
    out = tmp_path / "out"
    streamed = prune_streaming(source, config, out, TEXT)
    assert_same_model(in_memory(source, config), out)
    assert streamed.plan.counts() == fastprune.Plan.load(out / "plan.json").counts()
    info = json.loads((out / "fastprune.json").read_text())
    assert info["config"]["sequential"] == config.sequential
    assert {r["pass"] for r in info["stream"]["layers"]} == {"score", "cut"}
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no partial directory left


def test_streamed_output_loads_with_plain_transformers_in_its_stored_dtype(tmp_path):
    source = save_source(tmp_path / "bf16", dtype=torch.bfloat16, channels=40, layers=3)
    config = PruningConfig(calibration=CAL, target_params=0.25)
    prune_streaming(source, config, tmp_path / "out", TEXT)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    shard = load_file(tmp_path / "out" / "model-layer-00000.safetensors")
    assert {t.dtype for t in shard.values()} == {torch.bfloat16}
    # In memory fastprune computes in float32 from the same bf16 weights: the bf16 outputs match.
    assert_same_model(in_memory(source, config), tmp_path / "out", dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[5, 6, 7]])).logits).all()


def test_per_layer_widths_stream_to_a_model_fastprune_and_remote_code_load(source, tmp_path):
    config = PruningConfig(calibration=CAL, criterion="obs", target_params=0.3, ranking="global")
    prune_streaming(source, config, tmp_path / "out", TEXT)
    assert (tmp_path / "out" / "modeling_fastprune.py").is_file()
    widths = json.loads((tmp_path / "out" / "config.json").read_text())["intermediate_size_per_layer"]
    assert len(set(widths)) > 1
    assert_same_model(in_memory(source, config), tmp_path / "out")


def test_a_given_plan_streams_without_scoring(source, tmp_path):
    config = PruningConfig(calibration=CAL, sequential=True)
    plan = in_memory(source, PruningConfig(calibration=CAL, target_params=0.3)).plan
    streamed = prune_streaming(source, config, tmp_path / "out", TEXT, plan=plan)
    assert streamed.scores is None and not (tmp_path / "out" / "scores.json").exists()
    expected = fastprune.prune(fastprune.load(source), config, TEXT, tokenizer=byte_tokenizer(), plan=plan)
    assert_same_model(expected, tmp_path / "out")


@pytest.mark.parametrize(("phase", "at"), [("score", 2), ("cut", 1), ("cut", 3)])
def test_an_interrupted_stream_resumes_from_the_last_finished_layer(source, tmp_path, monkeypatch, phase, at):
    config = PruningConfig(calibration=CAL, target_params=0.3, sequential=True)
    out = tmp_path / "out"
    loads, armed = [], [True]
    original_load, original_keep = stream.StreamHolder.load, stream.StreamHolder.keep

    def load(self, i):
        loads.append(i)
        if armed[0] and phase == "score" and len(loads) == at + 1:
            raise KeyboardInterrupt
        original_load(self, i)

    def keep(self, i, new):
        if armed[0] and phase == "cut" and i == at:
            raise KeyboardInterrupt
        original_keep(self, i, new)

    monkeypatch.setattr(stream.StreamHolder, "load", load)
    monkeypatch.setattr(stream.StreamHolder, "keep", keep)
    with pytest.raises(KeyboardInterrupt):
        prune_streaming(source, config, out, TEXT)
    assert not out.exists()
    assert (tmp_path / ".out.stream-partial").is_dir()
    armed[0] = False
    loads.clear()
    prune_streaming(source, config, out, TEXT)
    if phase == "score":  # layers 0..at-1 were scored; the rest of scoring, then all 4 layers cut
        assert loads == list(range(at, 4)) + list(range(4))
    else:  # scoring is not repeated; the cutting pass restarts at the interrupted layer
        assert loads == list(range(at, 4))
    assert_same_model(in_memory(source, config), out)
    assert not (tmp_path / ".out.stream-partial").exists()


def test_a_partial_stream_with_other_settings_is_discarded(source, tmp_path, monkeypatch):
    out = tmp_path / "out"

    def boom(self, i, new):
        raise KeyboardInterrupt

    monkeypatch.setattr(stream.StreamHolder, "keep", boom)
    with pytest.raises(KeyboardInterrupt):
        prune_streaming(source, PruningConfig(calibration=CAL, target_params=0.3), out, TEXT)
    monkeypatch.undo()
    config = PruningConfig(calibration=CAL, criterion="wanda", channel_ratio=0.5)
    prune_streaming(source, config, out, TEXT)
    assert_same_model(in_memory(source, config), out)


def run(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_streams_and_says_how_to_evaluate(source, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = run(["prune", "--model", str(source), "--stream", *CLI_CAL, "--out", str(out)], capsys)
    assert code == 0, err
    assert "streamed 4 layers on 1 process(es)" in stdout and "fastprune eval" in stdout
    assert AutoModelForCausalLM.from_pretrained(out).config.intermediate_size < 48


def test_cli_streams_by_itself_when_the_model_would_not_fit(source, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(stream, "memory_available", lambda: stream.memory_needed(source) - 1)
    code, stdout, err = run(["prune", "--model", str(source), *CLI_CAL, "--out", str(tmp_path / "out")], capsys)
    assert code == 0, err
    assert "streamed 4 layers" in stdout
    assert "stream" in json.loads((tmp_path / "out" / "fastprune.json").read_text())


def _break_shape(path):
    index = json.loads((path / "model.safetensors.index.json").read_text())
    key = next(k for k in index["weight_map"] if "layers.1.mlp.down_proj" in k)
    file = path / index["weight_map"][key]
    tensors = load_file(file)
    tensors[key] = tensors[key][:, :-8].contiguous()
    save_file(tensors, file)


def _drop_tensor(path):
    index = json.loads((path / "model.safetensors.index.json").read_text())
    name = next(k for k in index["weight_map"] if "layers.3.mlp.up_proj" in k)
    file = path / index["weight_map"][name]
    tensors = load_file(file)
    del tensors[name]
    save_file(tensors, file)
    del index["weight_map"][name]
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


def _fewer_layers_in_config(path):
    config = json.loads((path / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (path / "config.json").write_text(json.dumps(config))


def _only_bin(path):
    for p in path.glob("*.safetensors*"):
        p.unlink()
    torch.save({}, path / "pytorch_model.bin")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_break_shape, "of another shape"),
        (_drop_tensor, "tensors missing"),
        (_fewer_layers_in_config, "layer tensors the config does not have"),
        (_only_bin, "no safetensors weights"),
    ],
)
def test_bad_checkpoints_fail_with_one_line_and_write_nothing(tmp_path, capsys, damage, message):
    src = save_source(tmp_path / "src", shards=True, channels=48)
    damage(src)
    capsys.readouterr()  # (saving the source printed a progress bar)
    code, stdout, err = run(["prune", "--model", str(src), "--stream", *CLI_CAL, "--out", str(tmp_path / "o")], capsys)
    assert code == 2
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_streaming_refuses_whole_model_criteria_and_latency_targets(source, tmp_path):
    with pytest.raises(ConfigError, match="taylor_local"):
        prune_streaming(
            source, PruningConfig(calibration=CAL, criterion="taylor", channel_ratio=0.5), tmp_path / "o", TEXT
        )
    with pytest.raises(ConfigError, match="latency"):
        prune_streaming(source, PruningConfig(calibration=CAL, target_latency_ms=5.0), tmp_path / "o", TEXT)
    with pytest.raises(ConfigError, match="loss_weighted"):
        config = PruningConfig(calibration=CAL, target_params=0.2, ranking="loss_weighted")
        prune_streaming(source, config, tmp_path / "o", TEXT)
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_reader_errors_name_the_problem(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match="no safetensors"):
        stream.SafetensorsCheckpoint(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        stream.SafetensorsCheckpoint(tmp_path)
    save_file({"a": torch.arange(6.0).view(2, 3)}, tmp_path / "model.safetensors")
    ckpt = stream.SafetensorsCheckpoint(tmp_path)
    assert torch.equal(ckpt.load(["a"])["a"], torch.arange(6.0).view(2, 3))
    ids = torch.tensor([[1, 1], [0, 1]])
    assert torch.equal(ckpt.rows("a", ids), torch.arange(6.0).view(2, 3)[ids])
    written = {"x": torch.randn(3, 5).to(torch.bfloat16), "n": torch.arange(7), "e": torch.zeros(0, 4)}
    stream.write_shard(tmp_path / "w.safetensors", written)
    stream.copy_tensors(tmp_path / "c.safetensors", ckpt, ["a"])
    for file, expected in (("w", written), ("c", {"a": torch.arange(6.0).view(2, 3)})):
        back = load_file(tmp_path / f"{file}.safetensors")
        assert back.keys() == expected.keys() and all(torch.equal(back[k], t) for k, t in expected.items())
    with open(tmp_path / "model.safetensors", "r+b") as f:
        f.truncate(os.path.getsize(tmp_path / "model.safetensors") - 4)
    with pytest.raises(CheckpointError, match="outside the file"):
        stream.SafetensorsCheckpoint(tmp_path)
