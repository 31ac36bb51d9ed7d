"""Recovery text written by the teacher: sampled continuations of calibration prompts, cached."""

import copy

import pytest
import torch
from tinymodels import tiny_decoder

from fastprune.adapters import adapter_for
from fastprune.errors import ConfigError
from fastprune.recovery import RecoveryConfig, recover
from fastprune.recovery import teacher_text as tt

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTPRUNE_CACHE", str(tmp_path))
    return tmp_path / "teacher-text"


def _windows(n=5, seq=40, seed=0):
    return torch.randint(4, 200, (n, seq), generator=torch.Generator().manual_seed(seed))


def test_teacher_keeps_the_prompt_and_samples_the_rest_from_its_own_distribution(cache):
    teacher = tiny_decoder(seed=1).eval()
    windows = _windows()
    written = tt.teacher_windows(teacher, windows, seed=3)
    assert written.shape == windows.shape
    assert torch.equal(written[:, : tt.PROMPT_TOKENS], windows[:, : tt.PROMPT_TOKENS])
    assert not torch.equal(written, windows)
    _assert_sampled_within_top_p(teacher, written, tt.PROMPT_TOKENS)


def _assert_sampled_within_top_p(teacher, written, prompt_tokens):
    """Each sampled token is drawn from the teacher's top-p set given everything before it (checked without cache)."""
    with torch.no_grad():
        logits = teacher(input_ids=written).logits[:, prompt_tokens - 1 : -1]
    probs = torch.softmax(logits.float(), -1)
    sorted_probs, order = probs.sort(-1, descending=True)
    allowed_sorted = sorted_probs.cumsum(-1) - sorted_probs <= tt.TOP_P
    allowed = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, allowed_sorted)
    sampled = written[:, prompt_tokens:]
    assert allowed.gather(-1, sampled[..., None]).all()


def test_without_a_prompt_the_teacher_writes_from_its_start_token(cache):
    teacher = tiny_decoder(seed=1).eval()
    windows = _windows()
    written = tt.teacher_windows(teacher, windows, seed=3, prompt_tokens=0)
    assert written.shape == windows.shape
    start = teacher.generation_config.bos_token_id
    assert start is not None and (written[:, 0] == start).all()
    assert len({tuple(w.tolist()) for w in written}) == len(written)  # each window its own text
    _assert_sampled_within_top_p(teacher, written, 1)
    # Another prompt length is other text (the cache keeps them apart).
    assert not torch.equal(tt.teacher_windows(teacher, windows, seed=3, prompt_tokens=2)[:, 2:], written[:, 2:])


def test_generation_batch_keeps_the_kv_cache_within_its_budget(monkeypatch):
    adapter = adapter_for(tiny_decoder())
    assert tt.generation_batch(adapter, 40) == tt.MAX_GENERATION_BATCH
    shape = adapter.shape()
    per_window = 2 * sum(s.kv_heads for s in shape.layers) * shape.head_dim * 40 * 4  # fp32 keys and values
    monkeypatch.setattr(tt, "KV_CACHE_BUDGET", 5 * per_window + 1)
    assert tt.generation_batch(adapter, 40) == 5
    monkeypatch.setattr(tt, "KV_CACHE_BUDGET", 1)
    assert tt.generation_batch(adapter, 40) == 1


def test_same_seed_same_text_from_the_cache_another_seed_other_text(cache, monkeypatch):
    teacher = tiny_decoder(seed=1).eval()
    windows = _windows()
    first = tt.teacher_windows(teacher, windows, seed=3)
    assert len(list(cache.glob("*.pt"))) == 1
    monkeypatch.setattr(tt, "_sample", lambda *a: pytest.fail("sampled again instead of reading the cache"))
    assert torch.equal(tt.teacher_windows(teacher, windows, seed=3), first)
    monkeypatch.undo()
    assert not torch.equal(tt.teacher_windows(teacher, windows, seed=4), first)
    assert not torch.equal(tt.teacher_windows(tiny_decoder(seed=2).eval(), windows, seed=3), first)


def test_recovery_trains_on_teacher_text_when_asked(cache):
    teacher, student = tiny_decoder(seed=1).eval(), tiny_decoder(seed=2)
    windows = _windows(n=12)
    runs = {}
    for share in (0.0, 1.0):
        config = RecoveryConfig(lr=1e-3, epochs=2, batch_size=2, teacher_text=share, val_fraction=0.2, patience=0)
        runs[share] = recover(copy.deepcopy(student), teacher, windows, config).model
    assert list(cache.glob("*.pt"))  # the teacher wrote text
    a, b = (dict(runs[s].named_parameters()) for s in (0.0, 1.0))
    assert any(not torch.equal(a[n], b[n]) for n in a)


def test_teacher_text_needs_a_teacher():
    with pytest.raises(ConfigError, match="teacher"):
        RecoveryConfig(mode="finetune", teacher_text=0.5)
    with pytest.raises(ConfigError, match="teacher_text"):
        RecoveryConfig(teacher_text=1.5)
    with pytest.raises(ConfigError, match="teacher_prompt"):
        RecoveryConfig(teacher_prompt=-1)
    with pytest.raises(ConfigError, match="teacher"):
        recover(tiny_decoder(), None, _windows(), RecoveryConfig(mode="lora", teacher_text=0.5))


def test_the_time_the_teacher_spends_writing_counts_against_the_budget(cache, monkeypatch):
    import time

    from fastprune.recovery import trainer

    def slow_writer(teacher, windows, seed, prompt_tokens):
        time.sleep(1.0)
        return windows

    monkeypatch.setattr(trainer, "teacher_windows", slow_writer)
    config = RecoveryConfig(lr=1e-3, max_steps=2, batch_size=2, teacher_text=0.5, time_budget_min=5)
    result = recover(tiny_decoder(seed=2), tiny_decoder(seed=1).eval(), _windows(n=12), config)
    assert result.seconds >= 1.0
