"""Fixtures shared by the unit tests."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    """The tiny offline GPT-2 style byte-level BPE tokenizer (no BOS, pad != eos)."""
    from tuneserve.tiny_models import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="session")
def bos_tokenizer() -> Any:
    """The tiny Llama style tokenizer: every encoded sequence starts with <s>."""
    from tuneserve.tiny_models import build_tokenizer

    return build_tokenizer(bos=True)
