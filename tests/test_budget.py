"""Memory and latency targets: budgets against measured quantities, the latency fit and its check loop."""

import pytest
from tinymodels import tiny_decoder

import fastprune
from fastprune import latency
from fastprune.adapters import adapter_for
from fastprune.budget import memory_budget, params_budget
from fastprune.config import CalibrationConfig, PruningConfig
from fastprune.errors import ConfigError, PlanError
from fastprune.evaluation import _weights_mb, kv_cache_mb

CAL = CalibrationConfig(num_samples=4, seq_len=48)


def test_params_budget_counts_exactly():
    model = tiny_decoder(attention_bias=True)
    adapter = adapter_for(model)
    budget = params_budget(adapter.shape(), adapter.param_costs(), 0.2)
    assert budget.of(adapter.shape()) == adapter.count_parameters()["non_embedding"]
    assert budget.limit == pytest.approx(0.8 * adapter.count_parameters()["non_embedding"])
    keep = params_budget(adapter.shape(), adapter.param_costs(), 30000)
    assert keep.limit == 30000
    with pytest.raises(ConfigError, match="has only"):
        params_budget(adapter.shape(), adapter.param_costs(), 10**9)


def test_memory_target_is_met_by_the_real_weights_and_kv_cache(tokenizer):
    model = tiny_decoder(heads=6, kv_heads=2, channels=48)
    adapter = adapter_for(model)
    dense_mb = _weights_mb(model) + kv_cache_mb(adapter, 1024)
    target = 0.8 * dense_mb
    config = PruningConfig(criterion="taylor", target_memory_mb=target, memory_context=1024, calibration=CAL)
    result = fastprune.prune(model, config, "pydoc:calibration", tokenizer=tokenizer)
    pruned_mb = _weights_mb(result.model) + kv_cache_mb(adapter_for(result.model), 1024)
    assert pruned_mb <= target
    assert result.plan.info["budget"]["predicted"] == pytest.approx(pruned_mb)
    budget = memory_budget(adapter.shape(), adapter.param_costs(), 0, 4, 1024, 1.0)
    assert budget.kv_head > budget.head  # a KV head also frees its cache


def fake_ms(model, kind, tokens, repeats=3):
    """A deterministic 'machine': latency linear in widths with known coefficients."""
    shape = adapter_for(model).shape()
    return (
        5.0 + 0.5 * shape.num_layers + sum(0.2 * s.heads + 0.3 * s.kv_heads + 0.01 * s.channels for s in shape.layers)
    )


def test_latency_fit_recovers_a_linear_machine(monkeypatch):
    monkeypatch.setattr(latency, "measure_ms", fake_ms)
    budget = latency.latency_budget(tiny_decoder(heads=6, kv_heads=2), "prefill", 32, limit_ms=10.0)
    got = [budget.fixed, budget.layer, budget.head, budget.kv_head, budget.channel]
    assert got == pytest.approx([5.0, 0.5, 0.2, 0.3, 0.01], rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("off", [1.1, 0.5, 2.0])
def test_latency_target_is_met_within_the_slack(off, monkeypatch, tokenizer, tmp_path):
    """The table is ``off`` times the machine (as when it was measured during other work): the measured check
    corrects the plan until the pruned model measures within the band."""
    import fastprune.pipeline as pipeline

    monkeypatch.setattr(latency, "measure_ms", fake_ms)
    monkeypatch.setattr(pipeline, "measure_ms", lambda m, k, t: off * fake_ms(m, k, t))
    monkeypatch.setenv("FASTPRUNE_CACHE", str(tmp_path))
    model = tiny_decoder(heads=6, kv_heads=2, channels=48)
    dense = fake_ms(model, "prefill", 32) * off
    config = PruningConfig(criterion="taylor", target_latency_ms=0.8 * dense, ranking="global", calibration=CAL)
    result = fastprune.prune(model, config, "pydoc:calibration", tokenizer=tokenizer)
    check = result.plan.info["latency_check"]
    assert 0.9 * 0.8 * dense <= check["measured_ms"] <= 0.8 * dense
    assert check["measured_ms"] == pytest.approx(off * fake_ms(result.model, "prefill", 32))


def test_unreachable_latency_target_is_refused_before_scoring(monkeypatch, tokenizer):
    import fastprune.pipeline as pipeline

    monkeypatch.setattr(latency, "measure_ms", fake_ms)
    monkeypatch.setattr(pipeline, "score_for_config", lambda *a, **k: pytest.fail("scored an infeasible target"))
    config = PruningConfig(criterion="taylor", target_latency_ms=1.0, calibration=CAL)
    with pytest.raises(PlanError, match="prefill_ms budget 1 cannot be met"):
        fastprune.prune(tiny_decoder(), config, "pydoc:calibration", tokenizer=tokenizer)


def test_one_target_at_a_time():
    with pytest.raises(ConfigError, match="one target at a time"):
        PruningConfig(target_params=0.2, target_memory_mb=100)
    with pytest.raises(ConfigError, match="whole count"):
        PruningConfig(target_params=1.5)
