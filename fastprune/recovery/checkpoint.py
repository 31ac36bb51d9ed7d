"""Interrupt-safe recovery checkpoints: one file, replaced atomically; Ctrl-C held off while state changes.

A checkpoint is written to a temporary file in the same directory, flushed to disk and renamed over the
previous one, so a crash or a second Ctrl-C during the write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import signal
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

import torch

from fastprune.errors import ConfigError

CHECKPOINT_FILE = "recovery.pt"


def checkpoint_path(directory: str | Path) -> Path:
    """Where ``recover`` keeps its checkpoint inside ``directory``."""
    return Path(directory) / CHECKPOINT_FILE


def save_checkpoint(directory: str | Path, payload: dict) -> Path:
    """Write ``payload`` to the checkpoint file atomically (temp file, fsync, rename)."""
    path = checkpoint_path(directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(directory: str | Path) -> dict | None:
    """The checkpoint's contents, or None when ``directory`` holds none."""
    path = checkpoint_path(directory)
    if not path.is_file():
        return None
    try:
        # weights_only: a checkpoint is tensors and plain data; never unpickle arbitrary objects.
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"cannot resume: recovery checkpoint {path} is unreadable ({e})") from e


def rng_state() -> dict:
    """torch's random generator states (CPU and every GPU): dropout and LoRA initialisation draw from them."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state`` returned."""
    torch.set_rng_state(state["cpu"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


@contextmanager
def deferred_interrupt():
    """Hold SIGINT until the block ends: Ctrl-C never lands between an optimizer step and its bookkeeping."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if not received or previous == signal.SIG_IGN:
        return
    if callable(previous):
        previous(signal.SIGINT, None)
    else:
        raise KeyboardInterrupt
