"""The command line on a tiny saved model: the whole flow, and every bad input failing with one clear line."""

import json
import math
import os

import pytest
import torch
from tinymodels import token_batch

import fastprune
from fastprune.cli import build_parser, main
from fastprune.config import CalibrationConfig
from fastprune.planning import Plan

FAST = ["--samples", "2", "--seq-len", "48", "--batch-size", "2"]
FAST_EVAL = ["--eval-windows", "2", "--eval-seq-len", "48", "--rounds", "1"]


def run(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_prune_writes_a_loadable_model_with_plan_provenance_and_report(model_dir, tmp_path, capsys):
    out = tmp_path / "pruned"
    code, stdout, err = run(
        [
            "prune",
            "--model",
            str(model_dir),
            *FAST,
            *FAST_EVAL,
            "--head-ratio",
            "0.333",
            "--channel-ratio",
            "0.25",
            "--criterion",
            "taylor",
            "--compare",
            "magnitude_l2",
            "--no-reconstruct",
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code == 0, err
    assert {
        "config.json",
        "model.safetensors",
        "plan.json",
        "fastprune.json",
        "report.json",
        "report.md",
    } <= set(os.listdir(out))
    report = json.loads((out / "report.json").read_text())
    assert [r["name"] for r in report["rows"]] == ["dense", "pruned (taylor)", "pruned (magnitude_l2)"]
    assert all(math.isfinite(r["quality"]["pydoc:heldout"]) for r in report["rows"])
    assert "| dense |" in stdout and "saved to" in stdout
    # The saved model is exactly the original cut by the saved plan.
    original = fastprune.load(model_dir)
    plan = Plan.load(out / "plan.json")
    from fastprune.adapters import adapter_for
    from fastprune.surgery import apply_plan

    apply_plan(adapter_for(original), plan)
    ids = token_batch()
    with torch.no_grad():
        assert torch.equal(fastprune.load(out)(ids).logits, original(ids).logits)
    assert plan.result_shape().layers[0].heads == 4


def test_score_plan_apply_equals_prune(model_dir, tmp_path, capsys):
    scores, plan = tmp_path / "scores.json", tmp_path / "plan.json"
    assert (
        run(["score", "--model", str(model_dir), *FAST, "--criterion", "fisher", "--out", str(scores)], capsys)[0] == 0
    )
    assert run(["plan", "--scores", str(scores), "--target-params", "0.3", "--out", str(plan)], capsys)[0] == 0
    code, _, err = run(
        ["apply", "--model", str(model_dir), "--plan", str(plan), "--no-eval", "--out", str(tmp_path / "a")],
        capsys,
    )
    assert code == 0, err
    code, _, err = run(
        [
            "prune",
            "--model",
            str(model_dir),
            *FAST,
            "--criterion",
            "fisher",
            "--target-params",
            "0.3",
            "--no-eval",
            "--out",
            str(tmp_path / "b"),
        ],
        capsys,
    )
    assert code == 0, err
    a, b = Plan.load(tmp_path / "a" / "plan.json"), Plan.load(tmp_path / "b" / "plan.json")
    assert a.cuts == b.cuts and a.drop_layers == b.drop_layers


def test_eval_compares_models_side_by_side(model_dir, tmp_path, capsys):
    code, stdout, err = run(["eval", str(model_dir), str(model_dir), *FAST_EVAL, "--report", str(tmp_path)], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["rows"][0]["quality"] == report["rows"][1]["quality"]


def _bad_plan(tmp_path, model_dir):
    plan = fastprune.load(model_dir)
    from fastprune.adapters import adapter_for

    shape = adapter_for(plan).shape().to_dict()
    path = tmp_path / "bad_plan.json"
    path.write_text(
        json.dumps(
            {
                "fastprune_plan": 1,
                "shape": shape,
                "drop_layers": [],
                "cuts": {"1": {"heads": list(range(6)), "kv_heads": [0, 1], "channels": []}},
            }
        )
    )
    return path


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("ratio", "head_ratio must be in [0, 1)"),
        ("missing_model", "model not found"),
        (
            "unsupported",
            "unsupported architecture 'gpt2': fastprune supports llama, mistral, qwen2, qwen3, bert",
        ),
        ("empty_text", "text file is empty"),
        ("short_text", "calibration text is too short"),
        ("out_exists", "already exists; pass --overwrite"),
        ("out_inside_input", "inside the input model's directory"),
        ("gqa", "nearest legal ratios"),
        ("all_heads", "removes every head of layer 1"),
        ("nan_scores", "NaN"),
    ],
)
def test_bad_input_fails_with_one_clear_line_and_writes_nothing(case, message, model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["prune", "--model", str(model_dir), *FAST, "--no-eval", "--out", str(out)]
    if case == "ratio":
        args += ["--head-ratio", "1.5"]
    elif case == "missing_model":
        args[2] = str(tmp_path / "nowhere")
    elif case == "unsupported":
        from transformers import GPT2Config, GPT2LMHeadModel

        GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(tmp_path / "gpt2")
        args[2] = str(tmp_path / "gpt2")
    elif case in ("empty_text", "short_text"):
        text = tmp_path / "text.txt"
        text.write_text("" if case == "empty_text" else "only a few words")
        args += ["--calibration", str(text)]
    elif case == "out_exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "out_inside_input":
        args[-1] = str(model_dir / "pruned")
    elif case == "gqa":
        args += ["--head-ratio", "0.3"]
    elif case == "all_heads":
        args = [
            "apply",
            "--model",
            str(model_dir),
            "--plan",
            str(_bad_plan(tmp_path, model_dir)),
            "--no-eval",
            "--out",
            str(out),
        ]
    elif case == "nan_scores":
        scores = tmp_path / "scores.json"
        assert main(["score", "--model", str(model_dir), "--criterion", "magnitude_l1", "--out", str(scores)]) == 0
        data = json.loads(scores.read_text())
        data["channels"][0][3] = float("nan")
        scores.write_text(json.dumps(data))
        args = [
            "plan",
            "--scores",
            str(scores),
            "--channel-ratio",
            "0.2",
            "--out",
            str(tmp_path / "plan.json"),
        ]
    before = sorted(os.listdir(tmp_path))
    capsys.readouterr()
    code, stdout, err = run(args, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], err
    assert "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == before
    if case == "out_exists":
        assert os.listdir(out) == ["keep.txt"]
    assert not (model_dir / "pruned").exists()


def test_ctrl_c_stops_cleanly_without_output(model_dir, tmp_path, capsys, monkeypatch):
    import fastprune.pipeline

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fastprune.pipeline, "score_for_config", interrupt)
    code, _, err = run(["prune", "--model", str(model_dir), *FAST, "--out", str(tmp_path / "out")], capsys)
    assert code == 130 and "interrupted" in err
    assert os.listdir(tmp_path) == []


def test_calibration_options_default_to_the_library_defaults():
    defaults = CalibrationConfig()
    prune = build_parser().parse_args(["prune", "--model", "m", "--out", "o"])
    assert (prune.samples, prune.seq_len, prune.batch_size, prune.recovery_samples) == (
        defaults.num_samples,
        defaults.seq_len,
        defaults.batch_size,
        defaults.recovery_samples,
    )
    recover = build_parser().parse_args(["recover", "--model", "m", "--out", "o"])
    assert (recover.samples, recover.seq_len) == (defaults.recovery_samples, defaults.seq_len)
