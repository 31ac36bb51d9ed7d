"""GGUF export: every tensor read back and dequantized against the source within its type's step, the model and
tokenizer reloaded by transformers, refusals, and prune --recover then export from the command line."""

import copy

import numpy as np
import pytest
import torch
from tinymodels import bpe_tokenizer, tiny_bert, tiny_decoder, token_batch
from transformers import AutoModelForCausalLM, AutoTokenizer

import fastprune
from fastprune.cli import main
from fastprune.errors import ConfigError, ExportError, OutputError
from fastprune.export import export_gguf
from fastprune.export.gguf import _permute_rotary
from fastprune.sparsity import SparsifyConfig, sparsify

VOCAB = 300
TEXT = "Return the value of x.attr, or 0 if <|im_end|> is unset: 3.14 m\u00fcller \u2014 done."


def gguf_tensors(path) -> dict[str, tuple[str, np.ndarray]]:
    """name -> (type name, float32 array in the source [out, in] layout) for every tensor of the file."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    return {
        t.name: (t.tensor_type.name, dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist()))))
        for t in GGUFReader(path).tensors
    }


def source_of(model, gguf_name: str) -> np.ndarray:
    """The model's tensor that a GGUF tensor holds (q and k rows in llama.cpp's rotary order)."""
    config = model.config
    if gguf_name == "token_embd.weight":
        w = model.model.embed_tokens.weight
    elif gguf_name == "output_norm.weight":
        w = model.model.norm.weight
    elif gguf_name == "output.weight":
        w = model.lm_head.weight
    else:
        _, i, part, _ = gguf_name.split(".")
        layer = model.model.layers[int(i)]
        w = {
            "attn_norm": layer.input_layernorm.weight,
            "ffn_norm": layer.post_attention_layernorm.weight,
            "attn_q": layer.self_attn.q_proj.weight,
            "attn_k": layer.self_attn.k_proj.weight,
            "attn_v": layer.self_attn.v_proj.weight,
            "attn_output": layer.self_attn.o_proj.weight,
            "ffn_gate": layer.mlp.gate_proj.weight,
            "ffn_up": layer.mlp.up_proj.weight,
            "ffn_down": layer.mlp.down_proj.weight,
        }[part]
        w = w.detach().numpy()
        heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}.get(part)
        return _permute_rotary(w, heads) if heads else w
    return w.detach().numpy()


def step_bound(kind: str, w: np.ndarray) -> np.ndarray:
    """Largest error each weight may have in a type: one quantization step of its 32-weight block (+ rounding of
    the fp16 scale), or fp16's relative rounding."""
    if kind == "F32":
        return np.zeros_like(w)
    if kind == "F16":
        return np.abs(w) * 2**-10 + 1e-7
    blocks = w.reshape(w.shape[0], -1, 32)
    amax = np.abs(blocks).max(-1, keepdims=True)
    span = blocks.max(-1, keepdims=True) - blocks.min(-1, keepdims=True)
    step = {"Q8_0": amax / 127, "Q4_0": amax / 8, "Q4_1": span / 15, "Q5_0": amax / 16, "Q5_1": span / 31}[kind]
    return np.broadcast_to(step * (1 + 2**-9) + 1e-7, blocks.shape).reshape(w.shape)


@pytest.fixture(scope="module")
def tokenizer():
    return bpe_tokenizer(VOCAB)


def block_decoder(**kw):
    """A tiny Llama whose matrices all have rows of whole 32-weight blocks (hidden 96, 6 heads of 16, 3 KV heads)."""
    return tiny_decoder(**{"heads": 6, "kv_heads": 3, "layers": 2, "channels": 64, "hidden": 96, "head_dim": 16, **kw})


@pytest.fixture(scope="module")
def model():
    return block_decoder(tie=False, vocab=VOCAB)  # an untied output matrix: every tensor kind of the format


@pytest.mark.parametrize(
    ("qtype", "search"),
    [(t, False) for t in ("f32", "f16", "q8_0", "q5_1", "q4_0", "q4_1")] + [("q4_0", True), ("q4_1", True)],
)
def test_exported_tensors_dequantize_to_the_source(model, tokenizer, tmp_path, qtype, search):
    """Round to nearest: every weight within one step of its block. Searched Q4 scales may clip a block's
    outlier to bring the rest closer, so there each block's root-mean-square error is within one step."""
    path = export_gguf(model, tokenizer, tmp_path / "m.gguf", qtype, search=search)
    tensors = gguf_tensors(path)
    assert len(tensors) == 3 + 2 * 9
    low_bit = qtype in ("q5_1", "q4_0", "q4_1")
    for name, (kind, data) in tensors.items():
        source = source_of(model, name)
        expected_kind = qtype.upper()
        if source.ndim == 1:
            expected_kind = "F32"
        elif name in ("token_embd.weight", "output.weight") and low_bit:
            expected_kind = "Q8_0"
        assert kind == expected_kind, name
        assert data.shape == source.shape, name
        bound = step_bound(kind, source)
        if search and kind in ("Q4_0", "Q4_1"):
            rms = np.sqrt(np.square(data - source).reshape(-1, 32).mean(1))
            assert (rms <= bound.reshape(-1, 32)[:, 0]).all(), name
        else:
            assert (np.abs(data - source) <= bound).all(), name


@pytest.mark.parametrize("qtype", ["q4_0", "q4_1"])
def test_searched_blocks_beat_round_to_nearest(model, tokenizer, tmp_path, qtype):
    """Without the search the blocks are gguf's own; with it no block has a larger error and the total is lower."""
    from gguf import GGMLQuantizationType, GGUFReader
    from gguf.quants import quantize

    nearest = GGUFReader(export_gguf(model, tokenizer, tmp_path / "n.gguf", qtype, search=False)).tensors
    searched = gguf_tensors(export_gguf(model, tokenizer, tmp_path / "s.gguf", qtype))
    kind = getattr(GGMLQuantizationType, qtype.upper())
    total = {"nearest": 0.0, "searched": 0.0}
    for t in nearest:
        if t.tensor_type != kind:
            continue
        source = source_of(model, t.name)
        assert np.array_equal(np.asarray(t.data).reshape(-1), quantize(source, kind).reshape(-1)), t.name
        rtn = gguf_tensors_one(t)
        errors = {
            "nearest": np.square(rtn - source).reshape(-1, 32).sum(1),
            "searched": np.square(searched[t.name][1] - source).reshape(-1, 32).sum(1),
        }
        assert (errors["searched"] <= errors["nearest"]).all(), t.name
        for k, e in errors.items():
            total[k] += e.sum()
    assert total["searched"] < 0.95 * total["nearest"]


def gguf_tensors_one(t) -> np.ndarray:
    from gguf.quants import dequantize

    return dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))


def test_keep_q8_writes_the_named_kinds_in_q8_0(model, tokenizer, tmp_path):
    tensors = gguf_tensors(export_gguf(model, tokenizer, tmp_path / "m.gguf", "q4_1", keep_q8=("attn_v", "ffn_down")))
    for name, (kind, _) in tensors.items():
        part = name.split(".")[-2]
        if name.startswith("blk.") and part != "attn_norm" and part != "ffn_norm":
            assert kind == ("Q8_0" if part in ("attn_v", "ffn_down") else "Q4_1"), name
    from gguf import GGUFReader, LlamaFileType

    assert GGUFReader(tmp_path / "m.gguf").fields["general.file_type"].contents() == LlamaFileType.MOSTLY_Q4_1
    with pytest.raises(ConfigError, match="among attn_q.*got attn_value"):
        export_gguf(model, tokenizer, tmp_path / "x.gguf", "q4_1", keep_q8=("attn_value",))
    assert not (tmp_path / "x.gguf").exists()


def test_rows_that_do_not_split_into_blocks_fall_back_to_f16(tokenizer, tmp_path):
    model = block_decoder(layers=1, channels=44, vocab=VOCAB)
    tensors = gguf_tensors(export_gguf(model, tokenizer, tmp_path / "m.gguf", "q8_0"))
    assert tensors["blk.0.ffn_down.weight"][0] == "F16"  # 44 inputs
    assert tensors["blk.0.ffn_up.weight"][0] == "Q8_0"  # 96 inputs
    assert "output.weight" not in tensors  # tied


def test_transformers_reloads_model_and_tokenizer(model, tokenizer, tmp_path):
    ids = token_batch(2, 19)
    with torch.no_grad():
        expected = model(ids).logits
        for qtype, atol in (("f32", 1e-5), ("q8_0", 2e-2)):
            export_gguf(model, tokenizer, tmp_path / f"{qtype}.gguf", qtype)
            loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=f"{qtype}.gguf", dtype=torch.float32)
            torch.testing.assert_close(loaded(ids).logits, expected, atol=atol, rtol=0)
    reloaded = AutoTokenizer.from_pretrained(tmp_path, gguf_file="f32.gguf")
    # Vocabulary and merges round-trip through transformers. The special tokens are checked in the file: how they
    # are read back varies (transformers 5.0 ignores add_bos_token and takes BOS for EOS, in llama.cpp's own
    # SmolLM2 file too).
    ids = reloaded(TEXT, add_special_tokens=False)["input_ids"]
    assert ids == tokenizer(TEXT, add_special_tokens=False)["input_ids"] and len(set(ids)) > 20
    from gguf import GGUFReader

    fields = GGUFReader(tmp_path / "f32.gguf").fields
    assert fields["tokenizer.ggml.bos_token_id"].contents() == tokenizer.bos_token_id == 1
    assert fields["tokenizer.ggml.eos_token_id"].contents() == tokenizer.eos_token_id == 2
    add_bos = fields["tokenizer.ggml.add_bos_token"].contents()
    assert add_bos is (tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id)


def test_sparse_models_are_written_with_their_masked_weights(model, tokenizer, tmp_path):
    sparse = sparsify(model, SparsifyConfig(criterion="magnitude")).model
    tensors = gguf_tensors(export_gguf(sparse, tokenizer, tmp_path / "s.gguf", "f32"))
    q = sparse.model.layers[1].self_attn.q_proj.dense_weight().detach().numpy()
    assert np.array_equal(tensors["blk.1.attn_q.weight"][1], _permute_rotary(q, 6))
    down = sparse.model.layers[0].mlp.down_proj.dense_weight().detach().numpy()
    assert np.array_equal(tensors["blk.0.ffn_down.weight"][1], down)


def test_refusals_write_nothing(model, tokenizer, tmp_path):
    per_layer = copy.deepcopy(model)
    fastprune.surgery.cut_mlp(fastprune.adapters.adapter_for(per_layer), 0, list(range(32)))
    with pytest.raises(ExportError, match="differ per layer"):
        export_gguf(per_layer, tokenizer, tmp_path / "a.gguf")
    with pytest.raises(ExportError, match="Llama models"):
        export_gguf(tiny_bert(), tokenizer, tmp_path / "b.gguf")
    (tmp_path / "c.gguf").write_text("keep me")
    with pytest.raises(OutputError, match="already exists"):
        export_gguf(model, tokenizer, tmp_path / "c.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.gguf"] and (tmp_path / "c.gguf").read_text() == "keep me"


@pytest.fixture(scope="module")
def bpe_model_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("models") / "tiny-bpe"
    block_decoder(vocab=VOCAB).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_cli_prune_recover_then_export(bpe_model_dir, tmp_path, capsys):
    pruned, out = tmp_path / "pruned", tmp_path / "pruned.q8_0.gguf"
    fast = ["--samples", "4", "--seq-len", "32", "--batch-size", "2", "--no-eval"]
    recover = ["--recover", "finetune", "--recover-max-steps", "2", "--recovery-samples", "4"]
    args = ["prune", "--model", str(bpe_model_dir), *fast, "--channel-ratio", "0.5", "--round-to", "32", *recover]
    assert main([*args, "--out", str(pruned)]) == 0, capsys.readouterr().err
    assert main(["export", "--model", str(pruned), "--to", "gguf", "--type", "q8_0", "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32)
    source = fastprune.load(pruned)
    assert loaded.config.intermediate_size == source.config.intermediate_size == 32
    ids = token_batch(1, 12)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, source(ids).logits, atol=2e-2, rtol=0)


def test_cli_export_errors_exit_2_and_write_nothing(bpe_model_dir, model_dir, tmp_path, capsys):
    per_layer, out = tmp_path / "global", tmp_path / "x.gguf"
    prune = ["prune", "--model", str(bpe_model_dir), "--samples", "4", "--seq-len", "32", "--no-eval"]
    prune += ["--criterion", "magnitude_l2", "--ranking", "global", "--target-params", "0.3", "--no-reconstruct"]
    assert main(["-q", *prune, "--out", str(per_layer)]) == 0
    capsys.readouterr()
    for model, message in ((per_layer, "differ per layer"), (model_dir, "no BPE merges")):
        assert main(["-q", "export", "--model", str(model), "--out", str(out)]) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' loading progress
        assert last.startswith("error: ") and message in last
    with pytest.raises(SystemExit) as exc:
        main(["export", "--model", str(bpe_model_dir), "--type", "q3_k", "--out", str(out)])
    assert exc.value.code == 2 and "invalid choice" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global"]


def test_cli_export_keep_q8_and_round_to_nearest(bpe_model_dir, tmp_path, capsys):
    from gguf import GGUFReader

    out = tmp_path / "m.gguf"
    args = ["export", "--model", str(bpe_model_dir), "--type", "q4_0", "--out", str(out)]
    assert main([*args, "--keep-q8", "attn_v, ffn_down", "--round-to-nearest"]) == 0
    assert "attn_v,ffn_down in q8_0" in capsys.readouterr().out
    kinds = {t.name: t.tensor_type.name for t in GGUFReader(out).tensors}
    assert kinds["blk.1.attn_v.weight"] == kinds["blk.0.ffn_down.weight"] == "Q8_0"
    assert kinds["blk.1.attn_k.weight"] == kinds["blk.0.ffn_up.weight"] == "Q4_0"
    api = export_gguf(
        fastprune.load(bpe_model_dir),
        AutoTokenizer.from_pretrained(bpe_model_dir),
        tmp_path / "api.gguf",
        "q4_0",
        keep_q8=("attn_v", "ffn_down"),
        search=False,
    )
    pairs = zip(GGUFReader(out).tensors, GGUFReader(api).tensors, strict=True)
    assert all(np.array_equal(a.data, b.data) for a, b in pairs)
    assert main(["-q", *args, "--overwrite", "--keep-q8", "ffn_dwn"]) == 2
    assert "error: keep_q8 takes matrix kinds" in capsys.readouterr().err
