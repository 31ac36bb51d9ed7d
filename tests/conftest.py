"""Shared fixtures; the model factories live in tinymodels.py (importable from every test module)."""

import pytest
import torch
from tinymodels import byte_tokenizer, tiny_decoder


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models train fastest on one thread; two make them erratic on a busy machine (OpenMP waits).
    A module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A tiny Llama (6 heads, 2 KV heads, 48 channels) with a byte tokenizer, saved as a model directory."""
    path = tmp_path_factory.mktemp("models") / "tiny"
    tiny_decoder(heads=6, kv_heads=2, channels=48).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path
