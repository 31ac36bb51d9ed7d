"""Each criterion against a direct computation on a tiny model (written out here, independent of fastprune)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from tinymodels import tiny_bert, tiny_decoder, token_batch

from fastprune.adapters import adapter_for
from fastprune.planning import LayerCut, Plan
from fastprune.scoring import score
from fastprune.surgery import apply_plan

D = 8  # head_dim of the tiny decoders


@pytest.fixture
def model():
    return tiny_decoder(heads=6, kv_heads=2, layers=3, attention_bias=True)


def batches(n=2, length=17):
    return [token_batch(batch=2, length=length, seed=s) for s in range(n)]


def unit_weights(model, i, kind, j):
    """All parameters of one unit, flattened, read straight from the Llama modules."""
    layer = model.model.layers[i]
    a, m = layer.self_attn, layer.mlp
    rows = slice(j * D, (j + 1) * D)
    if kind == "heads":
        return [a.q_proj.weight[rows], a.q_proj.bias[rows], a.o_proj.weight[:, rows]]
    if kind == "kv_heads":
        return [a.k_proj.weight[rows], a.k_proj.bias[rows], a.v_proj.weight[rows], a.v_proj.bias[rows]]
    return [m.gate_proj.weight[j], m.up_proj.weight[j], m.down_proj.weight[:, j]]


def widths(model):
    return {"heads": 6, "kv_heads": 2, "channels": model.config.intermediate_size}


@pytest.mark.parametrize("p", [1, 2])
def test_magnitude_is_the_norm_of_a_units_weights(model, p):
    s = score(adapter_for(model), [], f"magnitude_l{p}")
    for kind, n in widths(model).items():
        for i in range(3):
            expected = torch.stack(
                [torch.cat([w.detach().flatten() for w in unit_weights(model, i, kind, j)]).norm(p) for j in range(n)]
            )
            torch.testing.assert_close(getattr(s, kind)[i].float(), expected, rtol=1e-5, atol=1e-6)


def test_taylor_and_fisher_equal_direct_gradient_products(model):
    data = batches()
    expected = {
        c: {k: torch.zeros(3, n, dtype=torch.float64) for k, n in widths(model).items()} for c in ("taylor", "fisher")
    }
    for batch in data:
        model.zero_grad()
        model(input_ids=batch, labels=batch).loss.backward()
        for kind, n in widths(model).items():
            for i in range(3):
                for j in range(n):
                    prods = _wg(model, i, kind, j)
                    expected["taylor"][kind][i, j] += prods.abs().sum().double()
                    expected["fisher"][kind][i, j] += prods.pow(2).sum().double()
    model.zero_grad()
    for criterion in ("taylor", "fisher"):
        s = score(adapter_for(model), data, criterion)
        for kind in widths(model):
            got = torch.stack(getattr(s, kind))
            torch.testing.assert_close(got, expected[criterion][kind], rtol=1e-4, atol=1e-9)
        layer_sums = sum(expected[criterion][k].sum(1) for k in widths(model))
        torch.testing.assert_close(s.layers, layer_sums, rtol=1e-4, atol=1e-9)


def _wg(model, i, kind, j):
    """w * grad for every parameter slice of one unit, flattened."""
    layer = model.model.layers[i]
    a, m = layer.self_attn, layer.mlp
    rows = slice(j * D, (j + 1) * D)

    def prod(p, idx):
        return (p.detach()[idx] * p.grad[idx]).flatten()

    if kind == "heads":
        return torch.cat(
            [
                prod(a.q_proj.weight, rows),
                prod(a.q_proj.bias, rows),
                prod(a.o_proj.weight, (slice(None), rows)),
            ]
        )
    if kind == "kv_heads":
        return torch.cat([prod(p, rows) for p in (a.k_proj.weight, a.k_proj.bias, a.v_proj.weight, a.v_proj.bias)])
    return torch.cat(
        [prod(m.gate_proj.weight, j), prod(m.up_proj.weight, j), prod(m.down_proj.weight, (slice(None), j))]
    )


def test_taylor_leaves_no_gradients_behind(model):
    score(adapter_for(model), batches(1), "taylor")
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())


def _captured_inputs(model, data):
    """Full inputs of every o_proj and down_proj, concatenated over batches."""
    heads, channels = {i: [] for i in range(3)}, {i: [] for i in range(3)}
    handles = []
    for i, layer in enumerate(model.model.layers):
        handles.append(
            layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a, i=i: heads[i].append(a[0].flatten(0, 1)))
        )
        handles.append(
            layer.mlp.down_proj.register_forward_pre_hook(lambda m, a, i=i: channels[i].append(a[0].flatten(0, 1)))
        )
    with torch.no_grad():
        for b in data:
            model(b)
    for h in handles:
        h.remove()
    return heads, channels


def test_activation_wanda_and_frequency_from_captured_inputs(model):
    data = batches()
    heads_in, channels_in = _captured_inputs(model, data)
    adapter = adapter_for(model)
    act, wanda, freq = (score(adapter, data, c) for c in ("activation", "wanda", "activation_frequency"))
    for i, layer in enumerate(model.model.layers):
        x_heads, x_ch = torch.cat(heads_in[i]).double(), torch.cat(channels_in[i]).double()
        tokens = x_heads.shape[0]
        head_rms = x_heads.pow(2).sum(0).view(6, D).sum(1).div(tokens).sqrt()
        torch.testing.assert_close(act.heads[i], head_rms, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(act.channels[i], x_ch.pow(2).mean(0).sqrt(), rtol=1e-5, atol=1e-9)
        w_o, w_down = (
            layer.self_attn.o_proj.weight.detach().double(),
            layer.mlp.down_proj.weight.detach().double(),
        )
        head_wanda = (w_o.abs() * x_heads.norm(dim=0)).sum(0).view(6, D).sum(1)
        torch.testing.assert_close(wanda.heads[i], head_wanda, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(wanda.channels[i], (w_down.abs() * x_ch.norm(dim=0)).sum(0), rtol=1e-5, atol=1e-9)
        active = sum((c.double().pow(2) > 0.01 * c.double().pow(2).mean()).sum(0) for c in channels_in[i])
        torch.testing.assert_close(freq.channels[i], active.double() / tokens)


def test_block_influence_is_one_minus_mean_cosine(model):
    data = batches()
    s = score(adapter_for(model), data, "block_influence")
    cos = torch.zeros(3, dtype=torch.float64)
    count = 0
    with torch.no_grad():
        for b in data:
            hs = model(b, output_hidden_states=True).hidden_states
            for i in range(2):  # the last entry of hidden_states is after the final norm
                cos[i] += F.cosine_similarity(hs[i], hs[i + 1], dim=-1).double().sum()
            count += b.numel()
    torch.testing.assert_close(s.layers[:2], 1 - cos[:2] / count, rtol=1e-5, atol=1e-7)
    assert s.heads is None and s.channels is None


def _loss(model, data):
    with torch.no_grad():
        return sum(float(model(input_ids=b, labels=b).loss) * b.shape[0] for b in data) / sum(b.shape[0] for b in data)


def test_sensitivity_equals_loss_increase_of_the_pruned_model(model):
    data = batches(1)
    s = score(adapter_for(model), data, "sensitivity")
    base = _loss(model, data)
    shape = adapter_for(model).shape()
    for i, h in [(0, 0), (1, 4), (2, 5)]:
        # One query head alone cannot be cut under GQA (groups must stay even), so the reference zeroes its weights.
        pruned = copy.deepcopy(model)
        with torch.no_grad():
            pruned.model.layers[i].self_attn.o_proj.weight[:, h * D : (h + 1) * D] = 0
        assert s.heads[i][h] == pytest.approx(_loss(pruned, data) - base, abs=1e-5)
    for i in range(3):
        pruned = copy.deepcopy(model)
        apply_plan(adapter_for(pruned), Plan(shape, {}, [i]))
        assert s.layers[i] == pytest.approx(_loss(pruned, data) - base, abs=1e-5)


def test_bert_contrastive_taylor_runs_on_an_encoder_without_lm_head():
    model = tiny_bert()
    data = [token_batch(batch=3, length=12, seed=s) for s in range(2)]
    s = score(adapter_for(model), data, "taylor")
    assert all(t.shape == (4,) and (t > 0).all() for t in s.heads)
    assert all((t > 0).all() for t in s.channels)


def test_channel_cut_then_score_works_on_pruned_models(model):
    """Scoring a model that was already pruned non-uniformly (iterative pruning) sees its real widths."""
    adapter = adapter_for(model)
    apply_plan(adapter, Plan(adapter.shape(), {1: LayerCut(channels=list(range(10)))}))
    s = score(adapter, batches(1), "taylor")
    assert [t.numel() for t in s.channels] == [44, 34, 44]
