"""The consumed-sample ledger: which samples the students have trained on, per epoch.

Saved with every checkpoint, so it always describes exactly the model state next to it:
after a failure, training resumes from that state and the ledger says which samples of
the interrupted epoch are still to come. The dataset of the restart skips them before the
teacher (raykd.pipeline.first_epoch), and the train loop drops any row the ledger already
holds (a retried or duplicated batch), so every sample is trained once per epoch.

`rows` counts the rows that actually went through forward/backward, summed over ranks;
rows == len(samples) == training-set size at the end of an epoch is the proof of
exactly-once. A bitmap per epoch (raykd.data.samples) keeps a billion samples in 125 MB.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np

from raykd.data.samples import SampleSet

FILE = "ledger.npz"


@dataclass
class Ledger:
    total: int  # sequences in the dataset's numbering (sample_index range)
    samples: dict[int, SampleSet] = field(default_factory=dict)  # epoch -> trained samples
    rows: dict[int, int] = field(default_factory=dict)  # epoch -> rows trained, all ranks

    def epoch(self, e: int) -> SampleSet:
        if e not in self.samples:
            self.samples[e] = SampleSet(self.total)
            self.rows[e] = 0
        return self.samples[e]

    def to_bytes(self) -> bytes:
        arrays = {"total": np.int64(self.total),
                  "epochs": np.asarray(sorted(self.samples), np.int64),
                  "rows": np.asarray([self.rows[e] for e in sorted(self.samples)], np.int64)}
        for e, s in self.samples.items():
            arrays[f"bits_{e}"] = s.bits
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> Ledger:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            total = int(z["total"])
            ledger = cls(total)
            for e, rows in zip(z["epochs"].tolist(), z["rows"].tolist()):
                ledger.samples[e] = SampleSet(total, z[f"bits_{e}"])
                ledger.rows[e] = rows
        return ledger


def fresh_rows(ledger: Ledger, epoch: int, index: np.ndarray, valid: np.ndarray,
               gathered: np.ndarray, rank: int) -> np.ndarray:
    """Which of this rank's rows to train: valid, not in the ledger yet, and not held in the
    same step by a lower rank. `gathered` (world, n) holds every rank's candidate
    sample_index this step (-1 = none); all ranks then mark all of them."""
    seen = ledger.epoch(epoch)
    fresh = valid & ~seen.contains(np.where(valid, index, 0))
    first = np.zeros(len(index), dtype=bool)
    first[np.unique(index, return_index=True)[1]] = True  # a repeat within the batch
    fresh &= first
    for r in range(rank):
        fresh &= ~np.isin(index, gathered[r][gathered[r] >= 0])
    return fresh


def candidates(ledger: Ledger, epoch: int, index: np.ndarray, valid: np.ndarray,
               width: int) -> np.ndarray:
    """This rank's rows not yet in the ledger, as a fixed-width row for all_gather."""
    seen = ledger.epoch(epoch)
    keep = valid & ~seen.contains(np.where(valid, index, 0))
    out = np.full(width, -1, np.int64)
    picked = index[keep]
    out[: len(picked)] = picked
    return out
