"""The quality benchmark's table: rows that build valid settings, and ratios to the dense model."""

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import quality  # noqa: E402

from fastprune.config import CalibrationConfig  # noqa: E402
from fastprune.data import BUILTIN_SOURCES, parse_mix  # noqa: E402
from fastprune.recovery import RecoveryConfig  # noqa: E402


def test_rows_are_valid_settings_and_never_calibrate_on_an_evaluation_text():
    rows = quality.rows()
    assert len({r.name for r in rows}) == len(rows)
    for row in rows:
        calibration, _ = quality.row_config(row)
        assert not {name for name, _ in parse_mix(calibration)} & set(quality.EVAL_TEXTS)
        recovery = {k: v for k, v in row.recovery.items() if k != "fit_budget"}
        RecoveryConfig(time_budget_min=row.recover_min, **recovery)
    assert set(quality.EVAL_TEXTS) <= set(BUILTIN_SOURCES)
    assert {r.target for r in rows} == {0.25, 0.40}


def test_before_rows_keep_the_old_calibration_and_new_rows_take_the_defaults():
    rows = {r.name: r for r in quality.rows()}
    calibration, before = quality.row_config(rows["before-25"])
    assert calibration == "pydoc:calibration"
    assert (before.calibration.num_samples, before.calibration.seq_len) == (32, 256)
    _, lever = quality.row_config(rows["len512-25"])
    assert (lever.calibration.num_samples, lever.calibration.seq_len) == (32, 512)
    calibration, new = quality.row_config(rows["new-25"])
    assert calibration == quality.DEFAULT_CALIBRATION and new.calibration == CalibrationConfig()


def test_markdown_shows_ratios_to_the_dense_model():
    results = {
        "windows": 4,
        "machine": "test",
        "rows": {
            "dense": {"ppl": dict.fromkeys(quality.EVAL_TEXTS, 10.0)},
            "x": {
                "ppl": dict.fromkeys(quality.EVAL_TEXTS, 25.0),
                "lever": "a lever",
                "removed_fraction": 0.25,
                "prune_s": 3.0,
                "load_1min": 1.25,
                "recovery": {"steps": 7, "seconds": 60, "lr": 5e-5},
            },
        },
    }
    text = quality.markdown(results)
    row = next(line for line in text.splitlines() if line.startswith("| x |"))
    assert row.count("25.00 (2.50x)") == len(quality.EVAL_TEXTS)
    assert "25.0%" in row and "7 steps, 60 s, lr 5e-05" in row and "3.0 (load 1.2)" in row
