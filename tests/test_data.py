"""Text sources, calibration mixes and their windows."""

import pytest
import torch

from fastprune.data import (
    BUILTIN_SOURCES,
    CalibrationError,
    parse_mix,
    read_text,
    stdlib_docstrings_text,
    text_windows,
    token_windows,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.mark.parametrize(
    ("spec", "parts"),
    [
        ("pydoc:calibration", [("pydoc:calibration", 1.0)]),
        ("pydoc:calibration+stdlib-docstrings", [("pydoc:calibration", 1.0), ("stdlib-docstrings", 1.0)]),
        ("pydoc:calibration:3+stdlib-docstrings:0.5", [("pydoc:calibration", 3.0), ("stdlib-docstrings", 0.5)]),
        ("stdlib-docstrings:2", [("stdlib-docstrings", 2.0)]),
    ],
)
def test_mix_names_and_weights(spec, parts):
    assert parse_mix(spec) == parts


def test_a_file_whose_name_looks_like_a_mix_is_one_source(tmp_path):
    path = tmp_path / "a+b:2.txt"
    path.write_text("text")
    assert parse_mix(str(path)) == [(str(path), 1.0)]


@pytest.mark.parametrize(
    ("spec", "message"),
    [("a:0+b", "positive number"), ("a:-1+b", "positive number"), ("a+a", "appears twice"), ("a++b", "empty")],
)
def test_bad_mixes_are_refused(spec, message):
    with pytest.raises(CalibrationError, match=message):
        parse_mix(spec)


def _text(tmp_path, name: str, char: str, n: int) -> str:
    path = tmp_path / name
    path.write_text(" ".join(f"{char}{i}" for i in range(n)))
    return str(path)


def test_mix_shares_windows_by_weight_and_keeps_each_source_in_order(tmp_path, tokenizer):
    a, b = _text(tmp_path, "a.txt", "a", 4000), _text(tmp_path, "b.txt", "b", 4000)
    mixed = text_windows(tokenizer, f"{a}:3+{b}:1", 32, 12)
    assert mixed.parts == {a: 9, b: 3} and mixed.ids.shape == (12, 32)
    alone_a = token_windows(tokenizer, read_text(a), 32, 9, a)
    alone_b = token_windows(tokenizer, read_text(b), 32, 3, b)
    assert torch.equal(mixed.ids, torch.cat([alone_a.ids, alone_b.ids]))
    assert mixed.describe()["parts"] == {a: 9, b: 3}
    assert mixed.digest != text_windows(tokenizer, f"{a}:1+{b}:3", 32, 12).digest


def test_a_single_source_is_exactly_its_token_windows(tmp_path, tokenizer):
    a = _text(tmp_path, "a.txt", "a", 2000)
    assert torch.equal(text_windows(tokenizer, a, 16, 5).ids, token_windows(tokenizer, read_text(a), 16, 5, a).ids)


def test_a_mix_needs_a_window_per_source(tmp_path, tokenizer):
    a, b = _text(tmp_path, "a.txt", "a", 500), _text(tmp_path, "b.txt", "b", 500)
    with pytest.raises(CalibrationError, match="cannot be shared"):
        text_windows(tokenizer, f"{a}+{b}", 16, 1)
    with pytest.raises(CalibrationError, match="needs a window count"):
        text_windows(tokenizer, f"{a}+{b}", 16, None)


def test_builtin_sources_are_distinct_texts():
    texts = {}
    for name in BUILTIN_SOURCES:
        try:
            texts[name] = read_text(name)
        except CalibrationError as exc:  # a machine may lack /usr/share/info or the license texts
            assert "needs" in str(exc)
    assert len(set(texts.values())) == len(texts)
    assert all(len(t) > 20000 for t in texts.values())


def test_stdlib_docstrings_leave_out_the_idle_package():
    import ast

    from fastprune.data import STDLIB_DIR

    text = stdlib_docstrings_text()
    idle = ast.parse((STDLIB_DIR / "idlelib" / "pyshell.py").read_text(encoding="utf-8"))
    idle_docs = [d for n in ast.walk(idle) if isinstance(n, ast.FunctionDef) and (d := ast.get_docstring(n))]
    assert idle_docs and not any(d in text for d in idle_docs if len(d) >= 200)
    functools = ast.parse((STDLIB_DIR / "functools.py").read_text(encoding="utf-8"))
    lru_cache = next(n for n in functools.body if isinstance(n, ast.FunctionDef) and n.name == "lru_cache")
    assert ast.get_docstring(lru_cache) in text


def test_prune_calibrates_on_the_mix_it_is_given(tmp_path, tokenizer):
    from tinymodels import tiny_decoder

    import fastprune
    from fastprune.config import CalibrationConfig, PruningConfig

    a, b = _text(tmp_path, "a.txt", "a", 3000), _text(tmp_path, "b.txt", "b", 3000)
    config = PruningConfig(criterion="obs", channel_ratio=0.25, calibration=CalibrationConfig(4, 32, 2))
    model = tiny_decoder()
    plans = {spec: fastprune.prune(model, config, spec, tokenizer).plan for spec in (a, f"{a}:1+{b}:3")}
    assert plans[f"{a}:1+{b}:3"].info["calibration"]["parts"] == {a: 1, b: 3}
    assert "parts" not in plans[a].info["calibration"]
    # Other calibration text, other statistics: the chosen channels differ.
    assert plans[a].cuts != plans[f"{a}:1+{b}:3"].cuts


@pytest.mark.parametrize(
    ("total", "weights", "expected"),
    [(4, [1, 3], [1, 3]), (32, [3, 1], [24, 8]), (5, [1, 1, 1], [2, 2, 1]), (3, [10, 1, 1], [1, 1, 1])],
)
def test_shares_are_proportional_sum_to_the_total_and_give_every_source_one(total, weights, expected):
    from fastprune.data import _shares

    assert _shares(total, weights) == expected
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        w = (torch.rand(int(torch.randint(1, 6, (1,), generator=g)), generator=g) + 0.01).tolist()
        n = len(w) + int(torch.randint(0, 100, (1,), generator=g))
        shares = _shares(n, w)
        assert sum(shares) == n and min(shares) >= 1
        assert all(abs(s - n * x / sum(w)) < 1 + 1e-9 or s == 1 for s, x in zip(shares, w, strict=True))
