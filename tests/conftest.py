"""Shared fixtures; the model factories live in tinymodels.py (importable from every test module)."""

import pytest
from tinymodels import byte_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return byte_tokenizer()
