from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.tiny import make_llama

# Keep tests off the user's caches and away from any hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 4-layer Llama with a 512-token BPE tokenizer (a real HF directory)."""
    return make_llama(tmp_path_factory.mktemp("models") / "teacher")
