"""Several processes through torchrun (gloo on CPU) against one process: streamed scoring, planning and cutting;
FSDP2 recovery and its sharded checkpoints."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from recovery_worker import run as run_recovery
from safetensors.torch import load_file
from test_stream import CLI_CAL, save_source

from fastprune.cli import main

HERE = Path(__file__).parent
ROOT = HERE.parent


def torchrun(args: list[str], processes: int = 2, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE)]), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), *args]
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return save_source(tmp_path_factory.mktemp("dist") / "src", shards=True, channels=48)


def test_two_processes_score_plan_and_cut_like_one(source, tmp_path, capsys):
    """8 windows in 4 batches, 2 per process; obs with sequential calibration (every layer all-reduces)."""
    args = ["prune", "--model", str(source), "--stream", "--sequential", *CLI_CAL, "--target-params", "0.3"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([*args, "--out", str(one)]) == 0, capsys.readouterr().err
    done = torchrun(["-m", "fastprune", *args, "--out", str(two)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "on 2 process(es)" in done.stdout and done.stdout.count("saved to") == 1  # rank 0 prints and writes
    scores = [json.loads((d / "scores.json").read_text()) for d in (one, two)]
    for kind in ("heads", "channels"):
        for a, b in zip(scores[0][kind], scores[1][kind], strict=True):
            torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-6, atol=1e-9)
    plans = [json.loads((d / "plan.json").read_text()) for d in (one, two)]
    assert plans[0]["cuts"] == plans[1]["cuts"] and plans[0]["drop_layers"] == plans[1]["drop_layers"]
    assert json.loads((two / "fastprune.json").read_text())["stream"]["processes"] == 2
    for name in sorted(p.name for p in one.glob("model-*.safetensors")):
        a, b = load_file(one / name), load_file(two / name)
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)


def test_a_process_count_that_does_not_divide_the_batches_is_refused(source, tmp_path):
    six_windows = ["--samples", "6", *CLI_CAL[2:]]  # 3 batches of 2
    done = torchrun(["-m", "fastprune", "prune", "--model", str(source), *six_windows, "--out", str(tmp_path / "o")])
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "3 calibration batches cannot be shared evenly by 2 processes" in errors[0]
    assert "exitcode  : 2" in done.stderr  # the processes exit 2; torchrun reports it
    assert list(tmp_path.iterdir()) == []


def test_two_process_fsdp_recovery_follows_one_process_and_resumes_from_a_sharded_checkpoint(tmp_path):
    run_recovery(tmp_path / "one.pt")
    one = torch.load(tmp_path / "one.pt")
    worker, checkpoints = str(HERE / "recovery_worker.py"), tmp_path / "ck"
    crashed = torchrun([worker, str(tmp_path / "two.pt"), "--checkpoint-dir", str(checkpoints), "--stop-after", "3"])
    assert crashed.returncode != 0 and not (tmp_path / "two.pt").exists()
    assert (checkpoints / "sharded" / "state.pt").is_file()
    assert len(list((checkpoints / "sharded").glob("*.distcp"))) == 2  # one shard per process
    resumed = torchrun([worker, str(tmp_path / "two.pt"), "--checkpoint-dir", str(checkpoints), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    two = torch.load(tmp_path / "two.pt")
    assert [h[0] for h in two["history"]] == [0, 2, 4, 6] and two["stop"] == "completed"
    for a, b in zip(one["history"], two["history"], strict=True):
        if a[1] is not None:
            assert b[1] == pytest.approx(a[1], rel=1e-4)
        assert b[2] == pytest.approx(a[2], rel=1e-3)  # (the mean of two shards' float32 losses: 1.8e-4 apart here)
    assert one["history"][-1][2] < one["history"][0][2]  # it learned, so the weights compared below moved
    for name, t in one["weights"].items():
        torch.testing.assert_close(two["weights"][name], t, rtol=1e-4, atol=1e-5)
