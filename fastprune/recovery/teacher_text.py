"""Training text the dense teacher writes itself: sampled continuations of calibration prompts.

Distilling on the teacher's own continuations shows the student what the teacher does beyond the calibration
corpus (its style, its topics, its mistakes), at the cost of sampling them. Samples are cached under
``~/.cache/fastprune/teacher-text``, keyed by the teacher's weights, the prompts and the sampling settings, so a
rerun (or a resumed recovery) trains on the same windows without sampling again.
"""

from __future__ import annotations

import hashlib
import io
import logging

import torch
from torch import nn
from tqdm.auto import tqdm

from fastprune.adapters import adapter_for
from fastprune.errors import ConfigError
from fastprune.io import atomic_write_bytes
from fastprune.models import cache_dir

logger = logging.getLogger(__name__)

#: Tokens of each calibration window kept as the prompt; the rest of the window is sampled.
PROMPT_TOKENS = 16
#: Sampling settings: plain temperature-1 sampling within the top 95% of probability mass.
TOP_P = 0.95
GENERATION_BATCH = 16


def teacher_windows(teacher: nn.Module, windows: torch.Tensor, seed: int, cache: bool = True) -> torch.Tensor:
    """Windows as long as ``windows``: each keeps its first PROMPT_TOKENS tokens and the teacher samples the rest."""
    if not adapter_for(teacher).causal:
        raise ConfigError("teacher-written text needs a decoder teacher (a model that generates text)")
    n, seq_len = windows.shape
    if seq_len <= PROMPT_TOKENS:
        raise ConfigError(f"teacher-written windows need more than {PROMPT_TOKENS} tokens; got {seq_len}")
    prompts = windows[:, :PROMPT_TOKENS].cpu()
    path = cache_dir() / "teacher-text" / f"{_key(teacher, prompts, seq_len, seed)}.pt"
    if cache and path.is_file():
        logger.info("teacher-written windows from %s", path)
        return torch.load(path).to(windows.device)
    device = next(teacher.parameters()).device
    out = []
    was_training = teacher.training
    teacher.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.inference_mode():
            torch.manual_seed(seed)  # the text depends on the seed only, and the caller's RNG is left as it was
            for batch in tqdm(prompts.split(GENERATION_BATCH), desc="teacher writes", unit="batch", disable=None):
                out.append(_sample(teacher, batch.to(device), seq_len).cpu())
    finally:
        teacher.train(was_training)
    ids = torch.cat(out)
    if cache:
        buffer = io.BytesIO()
        torch.save(ids, buffer)
        atomic_write_bytes(path, buffer.getvalue())
    return ids.to(windows.device)


def _sample(model: nn.Module, prompts: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Nucleus sampling (temperature 1, top-p) to exactly ``seq_len`` tokens with transformers' ``generate``."""
    new = seq_len - prompts.shape[1]
    pad = model.generation_config.pad_token_id
    if pad is None:
        pad = model.generation_config.eos_token_id
    return model.generate(
        prompts,
        attention_mask=torch.ones_like(prompts),
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=TOP_P,
        max_new_tokens=new,
        min_new_tokens=new,
        pad_token_id=pad if not isinstance(pad, list) else pad[0],
    )


def _key(teacher: nn.Module, prompts: torch.Tensor, seq_len: int, seed: int) -> str:
    h = hashlib.sha256()
    for name, tensor in teacher.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    h.update(prompts.numpy().tobytes())
    h.update(f"{seq_len} {seed} {TOP_P}".encode())
    return h.hexdigest()[:32]
