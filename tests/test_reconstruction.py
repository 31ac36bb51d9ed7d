"""Least-squares reconstruction and the OBS criterion against brute-force computations."""

import copy
import itertools

import pytest
import torch
from tinymodels import tiny_decoder, token_batch

import fastprune
from fastprune.adapters import adapter_for
from fastprune.planning import LayerCut, Plan
from fastprune.reconstruction import grams_for_plan, least_squares_weight, reconstruct, tokens_needed
from fastprune.scoring.obs import obs_group_scores
from fastprune.surgery import apply_plan


def ridge_lstsq(x, w, keep, damping):
    """argmin_V ||x w^T - x_K V^T||^2 + ridge ||V||^2, by an augmented least-squares problem."""
    x_k = x[:, keep]
    ridge = damping * (x_k * x_k).sum(0).mean()
    a = torch.cat([x_k, ridge.sqrt() * torch.eye(len(keep), dtype=x.dtype)])
    b = torch.cat([x @ w.T, torch.zeros(len(keep), w.shape[0], dtype=x.dtype)])
    return torch.linalg.lstsq(a, b).solution.T


@pytest.mark.parametrize(("n", "out", "tokens"), [(12, 5, 40), (33, 7, 20)])
def test_least_squares_weight_matches_a_direct_solve(n, out, tokens):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(tokens, n, generator=g, dtype=torch.float64)
    w = torch.randn(out, n, generator=g, dtype=torch.float64)
    keep = torch.tensor(sorted(torch.randperm(n, generator=g)[: n // 2].tolist()))
    got = least_squares_weight(w, x.T @ x, keep, damping=0.05)
    torch.testing.assert_close(got, ridge_lstsq(x, w, keep, 0.05), rtol=1e-8, atol=1e-10)


def _brute_force_best(x, w, alive_groups, removed, group, damping):
    """The alive group whose removal (with the already removed ones) leaves the smallest refit error."""
    errors = {}
    for j in alive_groups:
        gone = set(removed) | {j}
        keep = torch.tensor([c for c in range(x.shape[1]) if c // group not in gone])
        v = ridge_lstsq(x, w, keep, damping)
        errors[j] = float(((x @ w.T - x[:, keep] @ v.T) ** 2).sum())
    return min(errors, key=errors.get)


@pytest.mark.parametrize("group", [1, 3])
def test_obs_order_is_the_greedy_least_squares_order(group):
    g = torch.Generator().manual_seed(group)
    n_groups = 7
    x = torch.randn(200, n_groups * group, generator=g, dtype=torch.float64)
    x[:, :group] *= 0.05  # make the order non-trivial
    w = torch.randn(4, n_groups * group, generator=g, dtype=torch.float64)
    damping = 1e-9  # the brute force uses the same ridge; tiny so both solve the plain problem
    scores = obs_group_scores(w, x.T @ x, group=group, block=1, damping=damping)
    order = torch.argsort(scores).tolist()
    removed = []
    for _ in range(n_groups - 2):
        alive = [j for j in range(n_groups) if j not in removed]
        removed.append(_brute_force_best(x, w, alive, removed, group, damping))
    assert order[: n_groups - 2] == removed
    assert all(a <= b for a, b in itertools.pairwise(scores[order].tolist()))


def reference_obs_scores(w, gram, group, block, damping):
    """The greedy OBS order with the inverse Hessian updated in full after every removal (the textbook form)."""
    n_groups = gram.shape[0] // group
    w = w.double().clone()
    hinv = torch.linalg.inv(gram + damping * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype))
    alive, scores, level = torch.ones(n_groups, dtype=torch.bool), torch.zeros(n_groups, dtype=torch.float64), 0.0
    while int(alive.sum()) > 1:
        cost = torch.full((n_groups,), float("inf"), dtype=torch.float64)
        live = alive.nonzero().flatten()
        idx = live[:, None] * group + torch.arange(group)  # [live groups, group] columns
        w_g = w[:, idx].permute(1, 0, 2)  # [live groups, out, group]
        inv_blocks = torch.linalg.inv(hinv[idx[:, :, None], idx[:, None, :]])
        cost[live] = torch.einsum("goi,gij,goj->g", w_g, inv_blocks, w_g)  # trace(w_g H^-1[g,g]^-1 w_g^T)
        picked = torch.topk(cost, min(block, int(alive.sum()) - 1), largest=False).indices
        for j in picked[torch.argsort(cost[picked])].tolist():
            level = max(level * (1 + 1e-15), float(cost[j]))
            scores[j] = level
        cols = (picked[:, None] * group + torch.arange(group)).flatten()
        m_inv = torch.linalg.inv(hinv[cols][:, cols])
        w -= w[:, cols] @ m_inv @ hinv[cols]
        hinv -= hinv[:, cols] @ m_inv @ hinv[cols]
        alive[picked] = False
    scores[alive] = level * 2
    return scores


OBS_CASES = [(37, 1, 8, 11), (50, 1, 3, 4), (9, 8, 1, 6), (6, 5, 2, 3)]  # groups, group size, block, outputs


@pytest.mark.parametrize(("n_groups", "group", "block", "out"), OBS_CASES)
def test_obs_low_rank_updates_give_the_order_of_full_updates(n_groups, group, block, out):
    g = torch.Generator().manual_seed(n_groups * group)
    n = n_groups * group
    x = torch.randn(3 * n, n, generator=g, dtype=torch.float64) @ torch.randn(n, n, generator=g, dtype=torch.float64)
    x += torch.randn(3 * n, n, generator=g, dtype=torch.float64)  # correlated inputs: the refits matter
    w = torch.randn(out, n, generator=g, dtype=torch.float64)
    got = obs_group_scores(w, x.T @ x, group=group, block=block, damping=1e-3)
    want = reference_obs_scores(w, x.T @ x, group, block, damping=1e-3)
    assert torch.argsort(got).tolist() == torch.argsort(want).tolist()
    removed = torch.argsort(want)[:-1]  # the last one's score is a stand-in in the reference
    torch.testing.assert_close(got[removed], want[removed], rtol=1e-9, atol=0)


def test_reconstruction_reduces_output_error_on_calibration_text():
    model = tiny_decoder(heads=6, kv_heads=2, layers=3, channels=48)
    adapter = adapter_for(model)
    batches = [token_batch(batch=4, length=40, seed=s) for s in range(3)]
    plan = Plan(adapter.shape(), {i: LayerCut(heads=[0, 3], channels=list(range(0, 48, 3))) for i in range(3)})

    def logits(m):
        with torch.no_grad():
            return torch.cat([m(b).logits for b in batches])

    dense = logits(model)
    plain = copy.deepcopy(model)
    apply_plan(adapter_for(plain), plan)
    refit = copy.deepcopy(model)
    refit_adapter = adapter_for(refit)
    reconstruct(refit_adapter, plan, grams_for_plan(refit_adapter, batches, plan), damping=1e-3)
    apply_plan(refit_adapter, plan)
    assert (logits(refit) - dense).pow(2).mean() < 0.5 * (logits(plain) - dense).pow(2).mean()
    # reconstruction changes values, never shapes
    assert adapter_for(refit).shape() == adapter_for(plain).shape()


def test_obs_criterion_prunes_end_to_end(tokenizer):
    model = tiny_decoder(heads=6, kv_heads=2, channels=48)
    config = fastprune.PruningConfig(
        criterion="obs", target_params=0.3, calibration=fastprune.CalibrationConfig(num_samples=4, seq_len=48)
    )
    result = fastprune.prune(model, config, "pydoc:calibration", tokenizer=tokenizer)
    assert result.scores.criterion == "obs"
    assert result.plan.info["removed_fraction"] >= 0.3
    assert set(result.seconds) >= {"score", "plan", "reconstruct", "surgery"}


@pytest.mark.parametrize("samples", [1, 8])
def test_refit_runs_only_with_enough_calibration_tokens(samples, caplog):
    """Fewer than MIN_TOKENS_PER_INPUT tokens per input of the widest projection: the refit is skipped with a
    warning (the model is sliced as it is); with enough, it runs."""
    model = tiny_decoder(heads=6, kv_heads=2, layers=2, channels=48)
    adapter = adapter_for(model)
    ids = token_batch(batch=samples, length=64, seed=1)
    config = fastprune.PruningConfig(
        criterion="magnitude_l2",
        channel_ratio=0.25,
        calibration=fastprune.CalibrationConfig(num_samples=samples, seq_len=64),
    )
    enough = ids.numel() >= tokens_needed(adapter)
    assert enough == (samples == 8)  # 64 tokens, 512 tokens; tokens_needed is 4 * 48
    with caplog.at_level("WARNING", logger="fastprune"):
        result = fastprune.prune(model, config, ids)
    assert result.plan.info["reconstructed"] is enough
    assert ("skipping the refit" in caplog.text) is not enough
    sliced = copy.deepcopy(model)
    apply_plan(adapter_for(sliced), result.plan)
    same = all(torch.equal(a, b) for a, b in zip(sliced.parameters(), result.model.parameters(), strict=True))
    assert same is not enough


def test_grams_of_an_earlier_prune_are_reused_with_the_same_result(tokenizer, monkeypatch):
    """prune(grams=result.grams) on the same model and windows skips collecting them and cuts exactly as without."""
    import fastprune.pipeline as pipeline

    model = tiny_decoder(heads=6, kv_heads=2, layers=3, channels=48)
    cal = fastprune.CalibrationConfig(num_samples=8, seq_len=48)
    first = fastprune.prune(
        model,
        fastprune.PruningConfig(criterion="obs", target_params=0.3, calibration=cal),
        "pydoc:calibration",
        tokenizer=tokenizer,
    )
    taylor = fastprune.PruningConfig(criterion="taylor", target_params=0.3, calibration=cal)
    fresh = fastprune.prune(model, taylor, "pydoc:calibration", tokenizer=tokenizer)
    monkeypatch.setattr(pipeline, "grams_for_plan", lambda *a: pytest.fail("collected the Gram matrices again"))
    monkeypatch.setattr(pipeline, "collect_grams", lambda *a: pytest.fail("collected the Gram matrices again"))
    reused = fastprune.prune(model, taylor, "pydoc:calibration", tokenizer=tokenizer, grams=first.grams)
    assert reused.plan.cuts == fresh.plan.cuts and reused.plan.info["reconstructed"]
    for a, b in zip(fresh.model.parameters(), reused.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.realmodel
def test_obs_on_smollm2_statistics_keeps_the_order_of_full_updates():
    """The default prune's Gram matrices (SmolLM2, 32 x 256 tokens of pydoc:calibration): same removal order."""
    from fastprune.models import load_source
    from fastprune.pipeline import calibration_windows
    from fastprune.reconstruction import collect_grams

    loaded = load_source("smollm2")
    adapter = adapter_for(loaded.model)
    config = fastprune.PruningConfig()
    windows = calibration_windows(loaded.tokenizer, "pydoc:calibration", config)
    layers = [0, 14, 29]
    grams = collect_grams(adapter, windows.batches(config.calibration.batch_size), layers, layers)
    for i in layers:
        for weight, gram, group, block in (
            (adapter.attention(i).o.weight, grams.heads[i], adapter.head_dim, 1),
            (adapter.mlp(i).output.weight, grams.channels[i], 1, 8),
        ):
            got = obs_group_scores(weight, gram, group, block, config.damping)
            want = reference_obs_scores(weight, gram, group, block, config.damping)
            assert torch.argsort(got).tolist() == torch.argsort(want).tolist(), f"layer {i}, group {group}"
