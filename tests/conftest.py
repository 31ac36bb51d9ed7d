"""Shared fixtures; the model factories live in tinymodels.py (importable from every test module)."""

import pytest
from tinymodels import CharTokenizer


@pytest.fixture
def char_tokenizer():
    return CharTokenizer()
