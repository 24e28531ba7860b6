"""What a student checkpoint holds, and saving/loading it safely.

    <checkpoint>/deepspeed/...     DeepSpeed engine state (every rank writes its part)
    <checkpoint>/ledger.npz        samples trained per epoch (raykd.student.ledger)
    <checkpoint>/progress.json     step, epoch, samples, tokens
    <checkpoint>/hf/               the exported student (final checkpoint only)

Ray Train makes a checkpoint visible only once every rank has reported it, so a crash
while writing leaves the previous checkpoint the latest one. Loading never unpickles
arbitrary objects: DeepSpeed's own loader uses torch.load(weights_only=False); here it
runs with weights_only=True and an allowlist of the three plain DeepSpeed types its
optimizer states contain.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from raykd.faults import maybe_fail
from raykd.student.ledger import FILE as LEDGER_FILE
from raykd.student.ledger import Ledger

TAG = "deepspeed"


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint."""

    ledger: Ledger  # samples trained on, per epoch (identical on every rank)
    step: int = 0
    epoch: int = 0
    samples: int = 0  # global, consumed
    tokens: int = 0  # global, target tokens trained on
    rows: int = 0  # this rank's rows trained in the current epoch since the last flush


def save(engine: Any, progress: Progress, directory: str, rank: int, run: str) -> None:
    """Every rank writes its DeepSpeed shard; rank 0 the ledger and progress."""
    engine.save_checkpoint(directory, tag=TAG)
    maybe_fail("checkpoint_write", step=progress.step, rank=rank, run=run)
    if rank == 0:
        Path(directory, LEDGER_FILE).write_bytes(progress.ledger.to_bytes())
        Path(directory, "progress.json").write_text(json.dumps(
            {"step": progress.step, "epoch": progress.epoch, "samples": progress.samples,
             "tokens": progress.tokens}))


def restore(engine: Any, directory: str) -> Progress:
    install_safe_loading(engine)
    engine.load_checkpoint(directory, tag=TAG)
    state = json.loads(Path(directory, "progress.json").read_text())
    ledger = Ledger.from_bytes(Path(directory, LEDGER_FILE).read_bytes())
    return Progress(ledger, step=state["step"], epoch=state["epoch"], samples=state["samples"],
                    tokens=state["tokens"])


def install_safe_loading(engine: Any) -> None:
    engine.checkpoint_engine = SafeCheckpointEngine()


def _deepspeed_globals() -> list[Any]:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


try:
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
except ImportError:  # pragma: no cover - deepspeed is a hard dependency
    TorchCheckpointEngine = object  # type: ignore[misc,assignment]


class SafeCheckpointEngine(TorchCheckpointEngine):  # type: ignore[misc,valid-type]
    """DeepSpeed's torch checkpoint engine, loading with weights_only=True."""

    def load(self, path: str, map_location: Any = None) -> Any:
        with torch.serialization.safe_globals(_deepspeed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
