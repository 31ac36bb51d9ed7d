"""Streaming SmolLM2-135M one layer at a time equals pruning it in memory: scores of every layer-local criterion,
the plan and the output weights (float32, 1e-5), also with sequential calibration in both."""

import pytest
import torch
from tinymodels import require_bundled

import fastprune
from fastprune.adapters import adapter_for
from fastprune.config import CalibrationConfig, PruningConfig
from fastprune.layerwise import LAYER_LOCAL_CRITERIA
from fastprune.layerwise.driver import score_layers
from fastprune.layerwise.shards import SafetensorsCheckpoint
from fastprune.layerwise.stream import StreamHolder, check_checkpoint, prune_streaming, skeleton
from fastprune.models import resolve_source
from fastprune.pipeline import calibration_windows
from fastprune.scoring import score

pytestmark = [pytest.mark.realmodel, pytest.mark.slow]

CAL = CalibrationConfig(num_samples=24, seq_len=256, batch_size=4)  # 6144 tokens: just enough for the refit


@pytest.fixture(scope="module")
def smollm2():
    require_bundled("smollm2")
    return fastprune.load_source("smollm2")


@pytest.fixture(scope="module")
def batches(smollm2):
    return calibration_windows(smollm2.tokenizer, "pydoc:calibration", PruningConfig(calibration=CAL)).batches(4)


def test_every_layer_local_criterion_scores_smollm2_alike_streamed_and_in_memory(smollm2, batches):
    directory = resolve_source("smollm2").directory
    model = skeleton(directory)
    checkpoint = SafetensorsCheckpoint(directory)
    check_checkpoint(model, checkpoint)
    holder = StreamHolder(checkpoint, model)
    calls = holder.calls(batches, list(range(len(batches))))
    adapter = adapter_for(smollm2.model)
    for criterion in LAYER_LOCAL_CRITERIA:
        streamed = score_layers(holder, calls, criterion)
        expected = score(adapter, batches, criterion)
        for kind in ("heads", "kv_heads", "channels"):
            for a, b in zip(getattr(streamed, kind) or [], getattr(expected, kind) or [], strict=True):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12, msg=f"{criterion} {kind}")
        if expected.layers is not None:
            torch.testing.assert_close(streamed.layers, expected.layers, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize(
    "settings",
    [
        dict(criterion="obs", target_params=0.25, sequential=True),
        dict(criterion="wanda", head_ratio=1 / 3, channel_ratio=0.25, ranking="global"),
        dict(criterion="fisher_local", channel_ratio=0.25, layer_ratio=0.1, sequential=True),
    ],
    ids=["obs-sequential", "wanda-global", "fisher_local-layers-sequential"],
)
def test_streamed_smollm2_equals_the_in_memory_prune(smollm2, tmp_path, settings):
    config = PruningConfig(calibration=CAL, **settings)
    expected = fastprune.prune(smollm2.model, config, "pydoc:calibration", tokenizer=smollm2.tokenizer)
    streamed = prune_streaming("smollm2", config, tmp_path / "out")
    assert streamed.plan.cuts == expected.plan.cuts and streamed.plan.drop_layers == expected.plan.drop_layers
    assert streamed.plan.info["reconstructed"] is True
    weights = fastprune.load(tmp_path / "out").state_dict()
    for name, t in expected.model.state_dict().items():
        torch.testing.assert_close(weights[name], t, rtol=0, atol=1e-5, msg=name)
