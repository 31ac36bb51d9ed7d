"""Shared fixtures; the model factories live in tinymodels.py (importable from every test module)."""

import pytest
from tinymodels import byte_tokenizer, tiny_decoder


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
