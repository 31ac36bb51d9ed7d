"""The core invariant: a physically pruned model equals the original with the same units zeroed / layers skipped."""

import copy

import pytest
import torch
from tinymodels import random_plan, tiny_bert, tiny_decoder, token_batch

from fastprune.adapters import adapter_for
from fastprune.planning import LayerCut, Plan
from fastprune.surgery import apply_plan

DECODERS = [
    ("llama", dict(heads=6, kv_heads=2)),  # GQA, 3 query heads per KV head
    ("llama", dict(heads=9, kv_heads=3, channels=45)),  # SmolLM2's head layout, odd width
    ("llama", dict(heads=4, kv_heads=4, tie=False)),  # MHA, untied head
    ("llama", dict(heads=6, kv_heads=2, attention_bias=True, mlp_bias=True)),
    ("mistral", dict(heads=8, kv_heads=2)),
    ("qwen2", dict(heads=6, kv_heads=3)),  # q/k/v biases
    ("qwen3", dict(heads=6, kv_heads=2)),  # per-head q/k norms
]


def zeroed_reference(model, plan: Plan):
    """The original model with the plan's units zeroed in the weights and its dropped layers removed."""
    ref = copy.deepcopy(model)
    adapter = adapter_for(ref)
    d = adapter.head_dim
    with torch.no_grad():
        for i, cut in plan.cuts.items():
            for h in cut.heads:
                adapter.attention(i).o.weight[:, h * d : (h + 1) * d] = 0
            for c in cut.channels:
                adapter.mlp(i).output.weight[:, c] = 0
    if plan.drop_layers:
        adapter.set_layers(plan.kept_layers())
    return ref


def pruned_copy(model, plan):
    pruned = copy.deepcopy(model)
    apply_plan(adapter_for(pruned), plan)
    return pruned


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("kind", "kw"), DECODERS, ids=[f"{k}-{i}" for i, (k, _) in enumerate(DECODERS)])
def test_decoder_pruned_equals_zeroed(kind, kw, seed):
    model = tiny_decoder(kind, seed=seed, **kw)
    gqa = "kv_groups" if seed == 2 else "query_heads"
    plan = random_plan(adapter_for(model).shape(), seed, drop=seed % 2 + 1, gqa=gqa)
    ids = token_batch(seed=seed)
    pruned = pruned_copy(model, plan)
    with torch.no_grad():
        expected = zeroed_reference(model, plan)(ids).logits
        got = pruned(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert adapter_for(pruned).shape() == plan.result_shape()


@pytest.mark.parametrize("seed", [0, 1])
def test_bert_pruned_equals_zeroed(seed):
    model = tiny_bert(seed=seed)
    plan = random_plan(adapter_for(model).shape(), seed, drop=1)
    ids = token_batch(seed=seed)
    with torch.no_grad():
        expected = zeroed_reference(model, plan)(ids).last_hidden_state
        got = pruned_copy(model, plan)(ids).last_hidden_state
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_layer_removal_equals_skipping():
    from fastprune.masking import skip_layers

    model = tiny_decoder(layers=5)
    adapter = adapter_for(model)
    plan = Plan(adapter.shape(), drop_layers=[1, 3])
    ids = token_batch()
    with torch.no_grad(), skip_layers(adapter, [1, 3]):
        expected = model(ids).logits
    pruned = pruned_copy(model, plan)
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, expected, atol=1e-5, rtol=0)
    assert pruned.config.num_hidden_layers == 3
    assert [layer.self_attn.layer_idx for layer in adapter_for(pruned).layers] == [0, 1, 2]


def test_masking_hooks_match_zeroed_weights():
    model = tiny_decoder(heads=9, kv_heads=3)
    plan = random_plan(adapter_for(model).shape(), seed=5, drop=1)
    from fastprune.masking import masked

    ids = token_batch()
    with torch.no_grad():
        expected = zeroed_reference(model, plan)(ids).logits
        with masked(adapter_for(model), plan):
            got = model(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_generate_with_kv_cache_matches_masked_model():
    """Greedy decoding with the KV cache gives the same tokens as the masked original (per-layer KV widths)."""
    from fastprune.masking import masked

    model = tiny_decoder(heads=6, kv_heads=2, layers=3)
    adapter = adapter_for(model)
    shape = adapter.shape()
    plan = Plan(shape, {0: LayerCut(kv_heads=[1], heads=[3, 4, 5]), 2: LayerCut(heads=[0, 4], channels=[1, 2, 3])})
    prompt = token_batch(batch=1, length=7)
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad(), masked(adapter, plan):
        expected = model.generate(prompt, **kwargs)
    pruned = pruned_copy(model, plan)
    with torch.no_grad():
        got = pruned.generate(prompt, **kwargs)
        # The cached path must also agree with full recomputation, logits by logits.
        full = pruned(got).logits[:, -1]
        cached = pruned(got[:, :-1], use_cache=True)
        step = pruned(got[:, -1:], past_key_values=cached.past_key_values).logits[:, -1]
    assert torch.equal(got, expected)
    torch.testing.assert_close(step, full, atol=1e-4, rtol=0)


def test_uniform_pruning_keeps_a_plain_config():
    model = tiny_decoder(heads=6, kv_heads=2, channels=48)
    shape = adapter_for(model).shape()
    cuts = {i: LayerCut(heads=[0, 3], channels=list(range(16))) for i in range(shape.num_layers)}
    pruned = pruned_copy(model, Plan(shape, cuts))
    cfg = pruned.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size, cfg.head_dim) == (
        4,
        2,
        32,
        8,
    )
    assert not hasattr(cfg, "auto_map")
    assert not any(k.endswith("_per_layer") for k in cfg.to_dict())


def test_param_costs_match_real_parameter_counts():
    for model in (tiny_decoder(attention_bias=True, mlp_bias=True), tiny_bert()):
        adapter = adapter_for(model)
        plan = random_plan(adapter.shape(), seed=3, drop=1)
        before = adapter.count_parameters()["non_embedding"]
        pruned = pruned_copy(model, plan)
        after = adapter_for(pruned).count_parameters()["non_embedding"]
        assert before - after == plan.removed_params(adapter.param_costs())
