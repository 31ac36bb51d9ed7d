"""Recovery: every mode lowers held-out loss on a pruned tiny model; losses match direct computations; LoRA
merges exactly; early stopping, time budget, atomic checkpoints and resume behave."""

import copy
import dataclasses
import math
import os
import signal
import time
import types

import pytest
import torch
import torch.nn.functional as F
from tinymodels import random_plan, tiny_bert, tiny_decoder, token_batch, train_briefly
from transformers import BertForMaskedLM

import fastprune
from fastprune.adapters import adapter_for
from fastprune.data import pydoc_text, token_windows
from fastprune.errors import CalibrationError, ConfigError
from fastprune.io import save_model
from fastprune.recovery import RecoveryConfig, recover, trainer
from fastprune.recovery import precision as precision_module
from fastprune.recovery.checkpoint import (
    checkpoint_path,
    deferred_interrupt,
    load_checkpoint,
    save_checkpoint,
)
from fastprune.recovery.fused_loss import distillation_loss
from fastprune.recovery.lora import add_lora, merge_lora
from fastprune.recovery.objectives import (
    embedding_match,
    layer_pairs,
    make_objective,
    relative_mse,
)
from fastprune.recovery.trainer import lr_factor
from fastprune.surgery import apply_plan

SEQ = 64


pytestmark = pytest.mark.usefixtures("one_thread")


def reference_kl(student_logits, teacher_logits, t):
    """T^2 * mean over positions of sum_v p_teacher * (log p_teacher - log p_student), in float64."""
    log_s = torch.log_softmax(student_logits.double() / t, -1)
    log_t = torch.log_softmax(teacher_logits.double() / t, -1)
    return t * t * (log_t.exp() * (log_t - log_s)).sum(-1).mean()


def heldout_loss(model, ids) -> float:
    model.eval()
    with torch.no_grad():
        return float(adapter_for(model).loss(ids))


def trainable_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def text_windows(tokenizer):
    train = token_windows(tokenizer, pydoc_text("calibration"), SEQ, 240, "pydoc:calibration")
    heldout = token_windows(tokenizer, pydoc_text("heldout"), SEQ, 32, "pydoc:heldout")
    return train, heldout


@pytest.fixture(scope="module")
def teacher_and_pruned(text_windows):
    """A tiny decoder trained briefly on Python's docs (so it is worth imitating), and a badly pruned copy."""
    train, _ = text_windows
    torch.manual_seed(0)
    teacher = train_briefly(tiny_decoder(), train.ids)
    config = fastprune.PruningConfig(
        criterion="magnitude_l2", head_ratio=2 / 3, channel_ratio=0.5, layer_ratio=0.25, reconstruct=False
    )
    pruned = fastprune.prune(teacher, config, train.ids[:16]).model
    return teacher, pruned


# -- every mode recovers -----------------------------------------------------------------------------------
DECODER_RUNS = [
    ("finetune", False, 1e-3),
    ("distill", True, 1e-3),
    ("lora", True, 1e-2),  # distils through the adapters
    ("lora", False, 1e-2),
]


@pytest.mark.parametrize(("mode", "use_teacher", "lr"), DECODER_RUNS, ids=["finetune", "distill", "lora-kd", "lora"])
def test_decoder_modes_lower_heldout_perplexity(text_windows, teacher_and_pruned, mode, use_teacher, lr):
    train, heldout = text_windows
    teacher, pruned = teacher_and_pruned
    student = copy.deepcopy(pruned)
    before = heldout_loss(student, heldout.ids)
    assert before > heldout_loss(teacher, heldout.ids) + 0.1  # the pruning did real damage
    config = RecoveryConfig(mode=mode, lr=lr, epochs=1, batch_size=8, eval_every=10, lora_rank=8)
    result = recover(student, teacher if use_teacher else None, train, config)
    after = heldout_loss(result.model, heldout.ids)
    assert after < before - 0.1, (before, after)
    assert result.stop_reason == "completed" and result.steps == 27
    assert result.best_val_loss < result.history[0].val_loss
    assert [p.step for p in result.history] == [0, 10, 20, 27]
    assert type(result.model) is type(pruned)
    assert not any("lora" in n for n, _ in result.model.named_parameters())
    assert adapter_for(result.model).shape() == adapter_for(pruned).shape()
    assert result.info["distilled"] is use_teacher


@pytest.fixture(scope="module")
def bert_windows(tokenizer):
    return token_windows(tokenizer, pydoc_text("calibration"), 34, 120, encoder=True).ids


def pruned_bert(model, ids):
    config = fastprune.PruningConfig(
        criterion="magnitude_l2", head_ratio=0.5, channel_ratio=0.5, layer_ratio=1 / 3, reconstruct=False
    )
    return fastprune.prune(model, config, ids[:8]).model


@pytest.fixture(scope="module")
def bert_pair(bert_windows):
    teacher = tiny_bert()
    return teacher, pruned_bert(teacher, bert_windows)


def embedding_gap(student, teacher, ids) -> float:
    with torch.no_grad():
        return float(embedding_match(student.eval()(ids).last_hidden_state, teacher(ids).last_hidden_state))


@pytest.mark.parametrize("mode", ["distill", "lora"])
def test_bert_distillation_lowers_heldout_embedding_gap(bert_pair, bert_windows, mode):
    teacher, pruned = bert_pair
    windows, heldout = bert_windows[:96], bert_windows[96:]
    before = embedding_gap(pruned, teacher, heldout)
    config = RecoveryConfig(mode=mode, lr=2e-3, alpha=1.0, epochs=2, batch_size=8)
    result = recover(copy.deepcopy(pruned), teacher, windows, config)
    after = embedding_gap(result.model, teacher, heldout)
    assert after < 0.5 * before, (before, after)


def test_bert_finetune_lowers_heldout_masked_lm_loss(bert_windows):
    torch.manual_seed(0)
    pruned = pruned_bert(BertForMaskedLM(tiny_bert().config).eval(), bert_windows)
    windows, heldout = bert_windows[:96], bert_windows[96:]
    before = heldout_loss(pruned, heldout)
    config = RecoveryConfig(mode="finetune", lr=1e-2, epochs=2, batch_size=8)
    after = heldout_loss(recover(copy.deepcopy(pruned), None, windows, config).model, heldout)
    assert after < before - 1.0, (before, after)


# -- the objectives match direct computations --------------------------------------------------------------
def reference_distillation_loss(student_logits, teacher_logits, ids, t, alpha):
    """The fused loss written plainly with autograd, in float64."""
    vocab = student_logits.shape[-1]
    ce = F.cross_entropy(student_logits[:, :-1].double().reshape(-1, vocab), ids[:, 1:].reshape(-1))
    return alpha * reference_kl(student_logits, teacher_logits, t) + (1 - alpha) * ce


# Shapes whose position count is and is not a multiple of the chunk (CHUNK_ROWS = 32), and one of a single chunk.
FUSED_CASES = [((2, 16), 2.0, 0.5), ((3, 23), 1.0, 0.3), ((1, 5), 3.5, 1.0), ((2, 40), 2.0, 0.0)]


@pytest.mark.parametrize(("shape", "temperature", "alpha"), FUSED_CASES, ids=[str(c) for c in FUSED_CASES])
def test_fused_distillation_loss_and_gradient_match_autograd(shape, temperature, alpha):
    gen = torch.Generator().manual_seed(sum(shape))
    student, teacher = torch.randn(2, *shape, 261, generator=gen).mul(4).unbind()
    ids = torch.randint(0, 261, shape, generator=gen)
    student.requires_grad_()
    got = distillation_loss(student, teacher, ids, temperature, alpha)
    (got * 3).backward()  # a non-unit upstream gradient
    want_student = student.detach().double().requires_grad_()
    want = reference_distillation_loss(want_student, teacher.double(), ids, temperature, alpha)
    (want * 3).backward()
    torch.testing.assert_close(got.double(), want.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(student.grad.double(), want_student.grad, atol=1e-7, rtol=1e-5)
    assert distillation_loss(teacher, teacher, ids, temperature, 1.0).abs() < 1e-6


def test_fused_distillation_loss_keeps_no_gradient_without_autograd():
    student, teacher = torch.randn(2, 2, 9, 50).unbind()
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        loss = distillation_loss(student.requires_grad_(), teacher, ids, 2.0, 0.5)
    assert loss.grad_fn is None
    want = reference_distillation_loss(student.detach(), teacher, ids, 2.0, 0.5)
    torch.testing.assert_close(loss.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_causal_distillation_objective_matches_direct_computation(alpha):
    student, teacher = tiny_decoder(layers=2, seed=1), tiny_decoder(layers=4, seed=2)
    ids = token_batch(3, 17)
    config = RecoveryConfig(alpha=alpha, temperature=2.0, hidden_weight=0.25)
    with torch.no_grad():
        s = student(ids, output_hidden_states=True)
        t = teacher(ids, output_hidden_states=True)
        got = make_objective(adapter_for(student), teacher, config)(ids)
    ce = F.cross_entropy(s.logits[:, :-1].reshape(-1, s.logits.shape[-1]), ids[:, 1:].reshape(-1))
    hidden = 0.0
    for i, j in [(1, 2), (2, 4)]:  # student layers 1, 2 of 2 meet teacher layers 2, 4 of 4
        s_h, t_h = s.hidden_states[i], t.hidden_states[j]
        hidden += ((s_h - t_h) ** 2).mean() / (t_h**2).mean() / 2
    expected = alpha * reference_kl(s.logits, t.logits, 2.0) + (1 - alpha) * ce + 0.25 * hidden
    torch.testing.assert_close(got.double(), expected.double(), atol=1e-5, rtol=1e-5)


def test_layer_pairs_meet_at_the_last_layer():
    assert layer_pairs(4, 4) == [(1, 1), (2, 2), (3, 3), (4, 4)]
    assert layer_pairs(2, 4) == [(1, 2), (2, 4)]
    assert layer_pairs(3, 4) == [(1, 1), (2, 3), (3, 4)]
    assert layer_pairs(1, 5) == [(1, 5)]


def test_relative_mse_is_scale_free():
    a, b = torch.randn(4, 9), torch.randn(4, 9)
    torch.testing.assert_close(relative_mse(100 * a, 100 * b), relative_mse(a, b))


def test_lr_schedule_warms_up_then_decays_to_zero():
    factors = [lr_factor(s, 20, 2) for s in range(21)]
    assert factors[0] > 0 and factors[0] < factors[1] < factors[2] == 1.0
    assert all(a >= b for a, b in zip(factors[2:], factors[3:], strict=False)) and factors[20] == 0.0


# -- LoRA --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["uniform", "per_layer_widths", "bert"])
def test_lora_merge_gives_the_unmerged_logits_and_a_plain_model(tmp_path, tokenizer, kind):
    if kind == "bert":
        model = tiny_bert()
    else:
        model = tiny_decoder("qwen2", heads=6, kv_heads=3)
        if kind == "per_layer_widths":  # a random plan leaves every layer its own widths
            apply_plan(adapter_for(model), random_plan(adapter_for(model).shape(), seed=1, drop=1))
    ids = token_batch()

    def output(m):
        with torch.no_grad():
            out = m.eval()(input_ids=ids)
        return out.last_hidden_state if kind == "bert" else out.logits

    dense = output(model)
    peft_model = add_lora(adapter_for(model), RecoveryConfig(mode="lora", lora_rank=4, lora_alpha=8))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero, which would make the merge trivially exact
                p.normal_(0, 0.05)
    unmerged = output(peft_model)
    assert (unmerged - dense).abs().max() > 1e-2  # the adapters matter
    assert torch.equal(output(model), unmerged)  # peft injects into the model itself, which recover calls
    merged = merge_lora(peft_model)
    torch.testing.assert_close(output(merged), unmerged, atol=1e-5, rtol=0)
    assert merged is model and not any(type(m).__module__.startswith("peft") for m in merged.modules())
    out = save_model(merged, tokenizer, tmp_path / "merged", {})
    torch.testing.assert_close(output(fastprune.load(out)), output(merged), atol=0, rtol=0)


# -- stopping ----------------------------------------------------------------------------------------------
def test_early_stopping_keeps_the_best_weights(text_windows, teacher_and_pruned):
    train, _ = text_windows
    student = copy.deepcopy(teacher_and_pruned[1])
    original = trainable_weights(student)
    # A learning rate this large makes every step worse than the start: the start stays best.
    config = RecoveryConfig(mode="finetune", lr=1.0, warmup=0.0, epochs=50, batch_size=8, eval_every=1, patience=2)
    result = recover(student, None, train, config)
    assert result.stopped_early and result.steps == 2 and result.best_step == 0
    assert result.history[1].val_loss > result.history[0].val_loss
    assert all(torch.equal(p, original[n]) for n, p in result.model.named_parameters())


def test_time_budget_stops_cleanly(text_windows, teacher_and_pruned):
    train, _ = text_windows
    teacher, pruned = teacher_and_pruned
    budget_min = 0.02
    config = RecoveryConfig(
        lr=1e-3, epochs=1000, max_steps=10**6, batch_size=8, eval_every=5, time_budget_min=budget_min
    )  # (with a step limit the schedule is not fitted to the budget: the budget just stops it)
    result = recover(copy.deepcopy(pruned), teacher, train, config)
    assert result.stopped_by_budget and 0 < result.steps < 1000 <= result.info["planned_steps"]
    assert result.seconds <= 60 * budget_min + 1.0  # it stops before the budget, not one epoch after
    assert result.history[-1].step == result.steps  # the last weights were evaluated before choosing the best
    assert result.best_val_loss == min(p.val_loss for p in result.history)


def test_time_budget_without_a_step_limit_fits_the_schedule_to_it(text_windows, teacher_and_pruned):
    ids = text_windows[0].ids[:40]
    teacher, pruned = teacher_and_pruned
    budget_min = 0.04
    config = RecoveryConfig(lr=1e-3, epochs=1, batch_size=8, eval_every=5, patience=0, time_budget_min=budget_min)
    one_epoch = 36 // config.batch_size  # (4 of the 40 windows are held out)
    result = recover(copy.deepcopy(pruned), teacher, ids, config)
    planned = result.info["planned_steps"]
    assert planned > 3 * one_epoch  # the budget, not the one epoch asked for, sets the length
    assert result.seconds <= 60 * budget_min + 1.0
    # On a quiet machine the fitted schedule ends as the budget does; under load steps may slow down after they
    # were timed, and then the budget stops the run first (it never overruns).
    if result.stop_reason == "completed":
        assert result.steps == planned and result.seconds > 0.5 * 60 * budget_min
        lrs = [p.lr for p in result.history]
        assert lrs[-1] < 0.1 * max(lrs)  # the cosine decay ran to (nearly) its end inside the budget
    else:
        assert result.stop_reason == "time_budget" and result.steps >= planned // 3


def test_a_fitted_schedule_is_fitted_again_when_steps_slow_down(text_windows, teacher_and_pruned, monkeypatch):
    # Steps become four times slower after the schedule was first fitted (as on a machine that gets busy): fitted
    # once, the run would stop on the budget at about a third of its plan with the learning rate still high.
    original_step = trainer._Run._step

    def step(run):
        time.sleep(0.02 if run.progress.step < 10 else 0.08)  # (sleeps dominate the tiny model's own step time)
        return original_step(run)

    monkeypatch.setattr(trainer._Run, "_step", step)
    ids = text_windows[0].ids[:40]
    teacher, pruned = teacher_and_pruned
    config = RecoveryConfig(lr=1e-3, epochs=1, batch_size=8, eval_every=5, patience=0, time_budget_min=0.08)
    result = recover(copy.deepcopy(pruned), teacher, ids, config)
    assert result.seconds <= 60 * config.time_budget_min + 1.0
    # Fitted again, it ends at or near its plan (fitted once: about a third of it, at a learning rate near its peak;
    # a busy machine may still stop it a few steps short).
    assert result.steps >= 0.8 * result.info["planned_steps"]
    lrs = [p.lr for p in result.history]
    assert lrs[-1] < 0.25 * max(lrs)


@pytest.mark.parametrize(
    "timed_sleep, later_sleep",
    [
        (0.08, 0.02),  # the first fit plans more than REFIT_STEPS further steps
        (0.3, 0.1),  # it plans fewer (slow steps, as on a loaded CI machine): checked again at its midpoint
    ],
)
def test_a_fitted_schedule_is_fitted_again_between_evaluations_when_steps_speed_up(
    text_windows, teacher_and_pruned, monkeypatch, timed_sleep, later_sleep
):
    # The timed first steps are three to four times slower than the rest, and no evaluation falls inside the run (a
    # short budget on a slow CPU): fitted once, the schedule would end with a third or more of its budget unspent.
    original_batches = trainer._Run._micro_batches

    def micro_batches(run, step):  # (inside the step's timed part)
        time.sleep(timed_sleep if step < trainer.TIMED_STEPS else later_sleep)
        return original_batches(run, step)

    monkeypatch.setattr(trainer._Run, "_micro_batches", micro_batches)
    ids = text_windows[0].ids[:40]
    teacher, pruned = teacher_and_pruned
    config = RecoveryConfig(lr=1e-3, epochs=1, batch_size=8, eval_every=10**4, patience=0, time_budget_min=0.05)
    result = recover(copy.deepcopy(pruned), teacher, ids, config)
    assert result.seconds <= 60 * config.time_budget_min + 1.0
    assert result.seconds >= 0.8 * 60 * config.time_budget_min  # (fitted once: two thirds of it or less)
    assert result.steps >= 0.8 * result.info["planned_steps"]


def test_the_budget_stop_allows_for_the_slowest_recent_step(text_windows, teacher_and_pruned, monkeypatch):
    # Every fourth step takes four times as long (a host shared with a periodic job), on a fake clock that only
    # the steps advance. Allowing for the last step's time alone, the stop check after three fast steps lets a
    # slow one start with 0.35 s of the 6.6 s budget left, and the run ends at 7.0 s.
    clock = types.SimpleNamespace(now=0.0)
    monkeypatch.setattr(trainer, "time", types.SimpleNamespace(perf_counter=lambda: clock.now))
    original_batches = trainer._Run._micro_batches

    def micro_batches(run, step):
        clock.now += 1.0 if step % 4 == 3 else 0.25
        return original_batches(run, step)

    monkeypatch.setattr(trainer._Run, "_micro_batches", micro_batches)
    ids = text_windows[0].ids[:40]
    teacher, pruned = teacher_and_pruned
    config = RecoveryConfig(lr=1e-3, epochs=1000, max_steps=10**6, batch_size=8, eval_every=5, time_budget_min=0.11)
    result = recover(copy.deepcopy(pruned), teacher, ids, config)
    assert result.stop_reason == "time_budget"
    assert result.seconds <= 60 * config.time_budget_min
    assert result.seconds == 5.75  # one slow step before the 6.6 s budget would run out: 14 steps, 3 of them slow


# -- checkpoints and resume --------------------------------------------------------------------------------
def _interrupt_at(model, mode: str, call: int):
    """Raise KeyboardInterrupt at the ``call``-th forward of ``model`` in train (or eval) mode: a Ctrl-C."""
    calls = []

    def hook(module, args, kwargs):
        if module.training == (mode == "train"):
            calls.append(1)
            if len(calls) == call:
                raise KeyboardInterrupt

    return model.register_forward_pre_hook(hook, with_kwargs=True)


RESUME_CASES = [
    # LoRA dropout draws from the RNG, so this also checks that the RNG state is restored.
    ("lora", "decoder", "train", 7),
    ("distill", "decoder", "eval", 3),
    ("finetune", "bert", "train", 9),  # BERT's dropout
]


@pytest.mark.parametrize(("mode", "model_kind", "where", "call"), RESUME_CASES)
def test_resume_after_interrupt_equals_uninterrupted_run(
    tmp_path, text_windows, teacher_and_pruned, bert_pair, bert_windows, mode, model_kind, where, call
):
    if model_kind == "bert":
        (teacher, pruned), ids = bert_pair, bert_windows[:40]
    else:
        teacher, pruned = teacher_and_pruned
        ids = text_windows[0].ids[:60]
    teacher = teacher if mode != "finetune" else None
    config = RecoveryConfig(
        mode=mode,
        lr=5e-3,
        epochs=3,
        batch_size=4,
        grad_accum=2,
        eval_every=3,
        checkpoint_every=2,
        lora_rank=4,
    )
    expected = recover(copy.deepcopy(pruned), teacher, ids, config)

    interrupted = copy.deepcopy(pruned)
    handle = _interrupt_at(interrupted, where, call)
    with pytest.raises(KeyboardInterrupt):
        recover(interrupted, teacher, ids, config, checkpoint_dir=tmp_path)
    handle.remove()
    saved_step = load_checkpoint(tmp_path)["progress"]["step"]
    assert 0 < saved_step < expected.steps

    resumed = recover(copy.deepcopy(pruned), teacher, ids, config, checkpoint_dir=tmp_path, resume=True)
    assert resumed.steps == expected.steps and resumed.best_step == expected.best_step
    assert [p.val_loss for p in resumed.history] == [p.val_loss for p in expected.history]
    got, want = dict(resumed.model.named_parameters()), dict(expected.model.named_parameters())
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)


def test_in_process_resume_after_lora_interrupt(tmp_path, text_windows, teacher_and_pruned):
    teacher, pruned = teacher_and_pruned
    ids = text_windows[0].ids[:40]
    config = RecoveryConfig(mode="lora", lr=5e-3, epochs=2, batch_size=4, eval_every=3, checkpoint_every=2)
    expected = recover(copy.deepcopy(pruned), teacher, ids, config)
    student = copy.deepcopy(pruned)
    handle = _interrupt_at(student, "train", 5)
    with pytest.raises(KeyboardInterrupt):
        recover(student, teacher, ids, config, checkpoint_dir=tmp_path)
    handle.remove()
    assert not any("lora" in n for n, _ in student.named_parameters())  # left without adapters, unchanged
    resumed = recover(student, teacher, ids, config, checkpoint_dir=tmp_path, resume=True)
    want = dict(expected.model.named_parameters())
    assert all(torch.equal(p, want[n]) for n, p in resumed.model.named_parameters())


def test_interrupted_checkpoint_write_leaves_the_previous_one(tmp_path, monkeypatch, text_windows, teacher_and_pruned):
    teacher, pruned = teacher_and_pruned
    ids = text_windows[0].ids[:40]
    config = RecoveryConfig(lr=5e-3, epochs=2, batch_size=4, eval_every=3, checkpoint_every=2)
    expected = recover(copy.deepcopy(pruned), teacher, ids, config)
    real_save, saves = torch.save, []

    def save_then_crash(obj, f):
        saves.append(1)
        if len(saves) == 1:
            return real_save(obj, f)
        f.write(b"half a checkpoint")  # Ctrl-C arrives in the middle of the second write
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        recover(copy.deepcopy(pruned), teacher, ids, config, checkpoint_dir=tmp_path)
    monkeypatch.undo()
    assert len(saves) == 3  # step 2 written; step 4 and the interrupt handler's own write both failed
    assert [p.name for p in tmp_path.iterdir()] == [checkpoint_path(tmp_path).name]  # no temp files left
    assert load_checkpoint(tmp_path)["progress"]["step"] == 2
    resumed = recover(copy.deepcopy(pruned), teacher, ids, config, checkpoint_dir=tmp_path, resume=True)
    want = dict(expected.model.named_parameters())
    assert all(torch.equal(p, want[n]) for n, p in resumed.model.named_parameters())


def test_ctrl_c_waits_for_the_end_of_an_optimizer_step():
    # Python's own Ctrl-C handler, also when the suite runs in the background (where SIGINT starts ignored).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    finished = []
    try:
        with pytest.raises(KeyboardInterrupt), deferred_interrupt():
            os.kill(os.getpid(), signal.SIGINT)
            finished.append(True)  # still runs: the interrupt is raised when the block ends
    finally:
        signal.signal(signal.SIGINT, previous)
    assert finished == [True]


def test_save_checkpoint_replaces_atomically(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, {"step": torch.tensor(1)})

    def crash(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, {"step": torch.tensor(2)})
    monkeypatch.undo()
    assert load_checkpoint(tmp_path)["step"] == 1 and len(list(tmp_path.iterdir())) == 1


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path, text_windows, teacher_and_pruned):
    teacher, pruned = teacher_and_pruned
    ids = text_windows[0].ids[:24]
    config = RecoveryConfig(lr=5e-3, epochs=1, batch_size=4, checkpoint_every=2)
    recover(copy.deepcopy(pruned), teacher, ids, config, checkpoint_dir=tmp_path)
    with pytest.raises(ConfigError, match="config"):
        recover(copy.deepcopy(pruned), teacher, ids, dataclasses.replace(config, lr=1e-3), tmp_path, resume=True)
    with pytest.raises(ConfigError, match="windows"):
        recover(copy.deepcopy(pruned), teacher, ids.flip(0), config, tmp_path, resume=True)
    # A longer time budget is no different run: it may resume.
    recover(
        copy.deepcopy(pruned),
        teacher,
        ids,
        dataclasses.replace(config, time_budget_min=5.0),
        tmp_path,
        resume=True,
    )


# -- memory-lean mode, gradient checkpointing, restored state ----------------------------------------------
def test_lean_mode_freezes_embeddings_and_norms_and_restores_the_model(text_windows, teacher_and_pruned):
    teacher, pruned = teacher_and_pruned
    student = copy.deepcopy(pruned).eval()
    student.model.layers[0].mlp.down_proj.requires_grad_(False)  # recover trains it anyway, then refreezes it
    flags = {n: p.requires_grad for n, p in student.named_parameters()}
    before = trainable_weights(student)
    config = RecoveryConfig(lr=5e-3, epochs=1, batch_size=4, lean=True, gradient_checkpointing=True)
    result = recover(student, teacher, text_windows[0].ids[:40], config)
    for name, p in result.model.named_parameters():
        frozen = "embed" in name or "norm" in name
        assert torch.equal(p, before[name]) == frozen, name
    assert {n: p.requires_grad for n, p in result.model.named_parameters()} == flags
    assert not result.model.training
    assert not any(getattr(m, "gradient_checkpointing", False) for m in result.model.modules())
    result.model.requires_grad_(False)  # then nothing is left that makes activations require grad
    assert not result.model(token_batch()).logits.requires_grad


def test_gradient_checkpointing_does_not_change_the_result(text_windows, teacher_and_pruned):
    teacher, pruned = teacher_and_pruned
    ids = text_windows[0].ids[:24]
    config = RecoveryConfig(mode="lora", lr=5e-3, epochs=1, batch_size=4)
    plain = recover(copy.deepcopy(pruned), teacher, ids, config)
    checkpointed = recover(
        copy.deepcopy(pruned), teacher, ids, dataclasses.replace(config, gradient_checkpointing=True)
    )
    want = dict(plain.model.named_parameters())
    for name, p in checkpointed.model.named_parameters():
        torch.testing.assert_close(p, want[name], atol=1e-6, rtol=1e-5)


PRECISION_CASES = [
    ("fp32", True, torch.float32),
    ("bf16", False, torch.bfloat16),
    ("auto", True, torch.bfloat16),
    ("auto", False, torch.float32),
]


@pytest.mark.parametrize(("precision", "native", "want"), PRECISION_CASES)
def test_recovery_runs_student_and_teacher_in_the_chosen_precision(
    text_windows, teacher_and_pruned, monkeypatch, precision, native, want
):
    teacher, pruned = teacher_and_pruned
    monkeypatch.setattr(precision_module, "native_bf16", lambda device: native)
    seen = {"student": set(), "teacher": set()}
    hooks = [
        adapter_for(model).mlp(0).output.register_forward_hook(lambda _m, _a, out, who=who: seen[who].add(out.dtype))
        for who, model in (("teacher", teacher), ("student", pruned))
    ]
    try:
        config = RecoveryConfig(lr=1e-3, max_steps=2, batch_size=4, precision=precision)
        result = recover(copy.deepcopy(pruned), teacher, text_windows[0].ids[:24], config)
    finally:
        for h in hooks:
            h.remove()
    # (the hook on ``pruned`` sees the deep copy's forward passes: hooks are copied with the module)
    assert seen == {"student": {want}, "teacher": {want}}
    assert result.info["autocast"] == (None if want == torch.float32 else "bfloat16")
    assert all(p.dtype == torch.float32 for p in result.model.parameters())  # weights stay float32


def test_autocast_is_only_for_float32_weights():
    assert precision_module.autocast_dtype("bf16", tiny_decoder(layers=1)) == torch.bfloat16
    assert precision_module.autocast_dtype("bf16", tiny_decoder(layers=1).to(torch.bfloat16)) is None


def test_bf16_recovery_follows_the_float32_run(text_windows, teacher_and_pruned):
    """Autocast changes rounding, not the training: both runs improve the held-out loss about alike."""
    teacher, pruned = teacher_and_pruned
    train, heldout = text_windows
    config = RecoveryConfig(lr=1e-3, epochs=1, batch_size=8, patience=0)
    before = heldout_loss(pruned, heldout.ids)
    after = {}
    for precision in ("fp32", "bf16"):
        run = recover(copy.deepcopy(pruned), teacher, train.ids, dataclasses.replace(config, precision=precision))
        after[precision] = heldout_loss(run.model, heldout.ids)
    assert after["fp32"] < before - 0.1
    assert abs(after["bf16"] - after["fp32"]) < 0.1 * (before - after["fp32"])


# -- configuration -----------------------------------------------------------------------------------------
def test_config_defaults_and_round_trip():
    assert RecoveryConfig().learning_rate == 2e-4
    assert RecoveryConfig(mode="finetune").learning_rate == 2e-5
    assert RecoveryConfig(mode="lora").learning_rate == 2e-4
    assert RecoveryConfig(mode="lora", lr=1e-3).learning_rate == 1e-3
    config = RecoveryConfig(mode="lora", lora_targets=["q_proj", "v_proj"], time_budget_min=20)
    assert RecoveryConfig.from_dict(config.to_dict()) == dataclasses.replace(config, lr=2e-4)
    assert all(f.metadata.get("help") for f in dataclasses.fields(RecoveryConfig))
    defaults = RecoveryConfig()
    assert (defaults.warmup, defaults.epochs, defaults.temperature, defaults.hidden_weight) == (
        0.1,
        2,
        2.0,
        0.0,
    )


BAD_CONFIGS = [
    dict(mode="prune"),
    dict(lr=0),
    dict(lr=-1e-5),
    dict(lr=math.nan),
    dict(warmup=1.0),
    dict(epochs=0),
    dict(epochs=1.5),
    dict(max_steps=0),
    dict(batch_size=0),
    dict(grad_accum=True),
    dict(val_fraction=0.0),
    dict(val_fraction=1.0),
    dict(eval_every=0),
    dict(patience=-1),
    dict(temperature=0.0),
    dict(alpha=1.5),
    dict(hidden_weight=-0.1),
    dict(mode="finetune", hidden_weight=1.0),
    dict(lora_rank=0),
    dict(lora_dropout=1.0),
    dict(lora_targets=[]),
    dict(time_budget_min=0),
    dict(time_budget_min=math.inf),
    dict(checkpoint_every=0),
    dict(precision="fp16"),
]


@pytest.mark.parametrize("kwargs", BAD_CONFIGS, ids=[str(k) for k in BAD_CONFIGS])
def test_bad_config_raises_config_error(kwargs):
    with pytest.raises(ConfigError, match="recovery|hidden_weight"):
        RecoveryConfig(**kwargs)


def test_from_dict_refuses_unknown_settings():
    with pytest.raises(ConfigError, match="unknown recovery settings: learning_rate"):
        RecoveryConfig.from_dict({"learning_rate": 1e-5})


def test_bad_calls_raise_clear_errors(tmp_path):
    student, ids = tiny_decoder(layers=2), token_batch(6, 16)
    bigger_vocab = tiny_decoder(layers=2)
    bigger_vocab.resize_token_embeddings(300)
    with pytest.raises(ConfigError, match="needs a teacher"):
        recover(student, None, ids, RecoveryConfig(mode="distill"))
    with pytest.raises(ConfigError, match="hidden_weight"):
        recover(student, None, ids, RecoveryConfig(mode="lora", hidden_weight=1.0))
    with pytest.raises(ConfigError, match="lora_targets name no linear module.*qkv"):
        recover(student, None, ids, RecoveryConfig(mode="lora", lora_targets=("q_proj", "qkv")))
    with pytest.raises(ConfigError, match="checkpoint_dir"):
        recover(student, None, ids, RecoveryConfig(mode="finetune"), resume=True)
    with pytest.raises(ConfigError, match="vocabulary"):
        recover(student, bigger_vocab, ids, RecoveryConfig())
    with pytest.raises(ConfigError, match="same kind"):
        recover(student, tiny_bert(), ids, RecoveryConfig())
    with pytest.raises(CalibrationError, match="at least 2 windows"):
        recover(student, None, ids[:1], RecoveryConfig(mode="finetune"))
    with pytest.raises(CalibrationError, match=r"\[N, T\]"):
        recover(student, None, ids[0], RecoveryConfig(mode="finetune"))
    (tmp_path / "recovery.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="unreadable"):
        recover(student, None, ids, RecoveryConfig(mode="finetune"), tmp_path, resume=True)
