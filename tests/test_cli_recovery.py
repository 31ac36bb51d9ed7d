"""Recovery and iterative pruning through the command line, on a tiny saved model."""

import json
import os

import fastprune
from fastprune.cli import main

FAST = ["--samples", "4", "--seq-len", "48", "--batch-size", "2", "--recovery-samples", "20"]
FAST_EVAL = ["--eval-windows", "2", "--eval-seq-len", "48", "--no-latency"]
FAST_RECOVERY = ["--recover-max-steps", "3", "--recover-eval-every", "1", "--recover-batch-size", "2"]


def test_prune_with_recovery_records_it(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(
        [
            "prune",
            "--model",
            str(model_dir),
            *FAST,
            *FAST_EVAL,
            "--criterion",
            "taylor",
            "--target-params",
            "0.3",
            "--recover",
            "finetune",
            *FAST_RECOVERY,
            "--recover-precision",
            "bf16",
            "--out",
            str(out),
        ]
    )
    assert code == 0, capsys.readouterr().err
    info = json.loads((out / "fastprune.json").read_text())
    assert info["recovery"]["config"]["mode"] == "finetune" and info["recovery"]["steps"] == 3
    assert info["recovery"]["config"]["precision"] == "bf16" and info["recovery"]["autocast"] == "bfloat16"
    report = json.loads((out / "report.json").read_text())
    assert report["rows"][1]["name"] == "pruned (taylor + finetune)"


def test_iterative_prune_reaches_the_target_in_steps(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(
        [
            "prune",
            "--model",
            str(model_dir),
            *FAST,
            *FAST_EVAL,
            "--criterion",
            "taylor",
            "--ranking",
            "global",
            "--target-params",
            "0.4",
            "--steps",
            "2",
            "--recover",
            "distill",
            *FAST_RECOVERY,
            "--out",
            str(out),
        ]
    )
    assert code == 0, capsys.readouterr().err
    info = json.loads((out / "fastprune.json").read_text())
    steps = info["steps"]
    assert [s["step"] for s in steps] == [1, 2]
    total = fastprune.load(model_dir).num_parameters(exclude_embeddings=True)
    assert steps[0]["non_embedding_params"] > steps[1]["non_embedding_params"]
    assert steps[1]["non_embedding_params"] <= 0.6 * total + 1
    assert all("pydoc:heldout" in s["quality"] and s["recovery"]["steps"] == 3 for s in steps)
    assert {"plan-step1.json", "plan-step2.json"} <= set(os.listdir(out))
    assert fastprune.load(out).num_parameters(exclude_embeddings=True) == steps[1]["non_embedding_params"]


def test_recover_command_distils_from_the_source_model(model_dir, tmp_path, capsys):
    pruned = tmp_path / "pruned"
    assert (
        main(
            [
                "prune",
                "--model",
                str(model_dir),
                *FAST,
                "--no-eval",
                "--no-reconstruct",
                "--target-params",
                "0.3",
                "--criterion",
                "magnitude_l2",
                "--out",
                str(pruned),
            ]
        )
        == 0
    )
    out = tmp_path / "recovered"
    code = main(
        [
            "recover",
            "--model",
            str(pruned),
            "--seq-len",
            "48",
            "--samples",
            "20",
            "--max-steps",
            "4",
            "--eval-every",
            "2",
            "--batch-size",
            "2",
            "--precision",
            "fp32",
            *FAST_EVAL,
            "--out",
            str(out),
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads((out / "report.json").read_text())
    names = [r["name"] for r in report["rows"]]
    assert names == ["dense", "pruned", "recovered (distill)"]
    ppl = {r["name"]: r["quality"]["pydoc:heldout"] for r in report["rows"]}
    assert ppl["recovered (distill)"] < ppl["pruned"]
    recovery = json.loads((out / "fastprune.json").read_text())["recovery"]
    assert recovery["config"]["mode"] == "distill" and recovery["autocast"] is None


def test_recover_without_a_known_teacher_is_refused(tmp_path, model_dir, capsys):
    code = main(["recover", "--model", str(model_dir), "--out", str(tmp_path / "out")])
    assert code == 2 and "give --teacher" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
