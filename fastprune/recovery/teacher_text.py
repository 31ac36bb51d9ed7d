"""Training text the dense teacher writes itself: sampled continuations of calibration prompts, or free text.

Distilling on the teacher's own continuations shows the student what the teacher does beyond the calibration
corpus (its style, its topics, its mistakes), at the cost of sampling them. With a prompt of 0 tokens the
teacher starts from its start-of-text token alone and writes on whatever topics it likes, which takes the student
furthest from the calibration corpus. Samples are cached under
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
from fastprune.evaluation import kv_cache_mb
from fastprune.io import atomic_write_bytes
from fastprune.models import cache_dir

logger = logging.getLogger(__name__)

#: Tokens of each calibration window kept as the prompt by default; the rest of the window is sampled.
PROMPT_TOKENS = 16
#: Sampling settings: plain temperature-1 sampling within the top 95% of probability mass.
TOP_P = 0.95
#: Windows sampled at once: up to 64 (on 2 CPU cores 64 write 1.4x the tokens per second of 16), fewer where their
#: KV cache would pass KV_CACHE_BUDGET bytes.
MAX_GENERATION_BATCH = 64
KV_CACHE_BUDGET = 2 * 2**30


def teacher_windows(
    teacher: nn.Module, windows: torch.Tensor, seed: int, prompt_tokens: int = PROMPT_TOKENS, cache: bool = True
) -> torch.Tensor:
    """Windows as long as ``windows``: each keeps its first ``prompt_tokens`` tokens and the teacher samples the
    rest; with ``prompt_tokens=0`` each starts with the teacher's start-of-text token and the rest is sampled."""
    adapter = adapter_for(teacher)
    if not adapter.causal:
        raise ConfigError("teacher-written text needs a decoder teacher (a model that generates text)")
    n, seq_len = windows.shape
    if seq_len <= max(prompt_tokens, 1):
        raise ConfigError(f"teacher-written windows need more than {max(prompt_tokens, 1)} tokens; got {seq_len}")
    if prompt_tokens > 0:
        prompts = windows[:, :prompt_tokens].cpu()
    else:
        prompts = torch.full((n, 1), _start_token(teacher), dtype=windows.dtype)
    path = cache_dir() / "teacher-text" / f"{_key(teacher, prompts, seq_len, seed, prompt_tokens)}.pt"
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
            batch_size = generation_batch(adapter, seq_len)
            for batch in tqdm(prompts.split(batch_size), desc="teacher writes", unit="batch", disable=None):
                out.append(_sample(teacher, batch.to(device), seq_len).cpu())
    finally:
        teacher.train(was_training)
    ids = torch.cat(out)
    if cache:
        buffer = io.BytesIO()
        torch.save(ids, buffer)
        atomic_write_bytes(path, buffer.getvalue())
    return ids.to(windows.device)


def generation_batch(adapter, seq_len: int) -> int:
    """How many windows of ``seq_len`` tokens to sample at once (their KV cache within KV_CACHE_BUDGET)."""
    per_window = kv_cache_mb(adapter, seq_len) * 2**20
    return max(1, min(MAX_GENERATION_BATCH, int(KV_CACHE_BUDGET // max(per_window, 1))))


def _start_token(model: nn.Module) -> int:
    """The token a document starts with (beginning-of-sequence, else end-of-sequence, which also separates
    documents)."""
    for source in (model.generation_config, model.config):
        for name in ("bos_token_id", "eos_token_id"):
            token = getattr(source, name, None)
            if isinstance(token, list):
                token = token[0] if token else None
            if token is not None:
                return int(token)
    raise ConfigError("the teacher has no start-of-text token to write from; give teacher_prompt > 0")


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


def _key(teacher: nn.Module, prompts: torch.Tensor, seq_len: int, seed: int, prompt_tokens: int) -> str:
    h = hashlib.sha256()
    for name, tensor in teacher.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    h.update(prompts.numpy().tobytes())
    h.update(f"{seq_len} {seed} {TOP_P} {prompt_tokens}".encode())
    return h.hexdigest()[:32]
