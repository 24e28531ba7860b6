"""Sets of packed sequences as bitmaps: one bit per sequence, so a billion fit in 125 MB.

Every packed sequence has a dense `sample_index`: the sequences of file f (files sorted as
the job lists them) are numbered offsets[f] .. offsets[f] + counts[f] - 1. The split, the
label cache's coverage and the consumed-sample ledger of each checkpoint are all
`SampleSet`s over that numbering.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np


@dataclass
class Layout:
    """How many sequences each file packs into, and so every sequence's dense index."""

    counts: np.ndarray  # int64, per file

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)

    @property
    def total(self) -> int:
        return int(self.counts.sum())


class SampleSet:
    """A subset of range(total), stored as packed bits."""

    def __init__(self, total: int, bits: np.ndarray | None = None):
        self.total = int(total)
        size = (self.total + 7) // 8
        self.bits = np.zeros(size, np.uint8) if bits is None else np.asarray(bits, np.uint8)
        if len(self.bits) != size:
            raise ValueError(f"{len(self.bits)} bytes cannot hold {self.total} bits")

    @classmethod
    def of(cls, total: int, indices: np.ndarray) -> SampleSet:
        s = cls(total)
        s.add(indices)
        return s

    def add(self, indices: np.ndarray) -> None:
        idx = np.asarray(indices, np.int64)
        np.bitwise_or.at(self.bits, idx >> 3, (0x80 >> (idx & 7)).astype(np.uint8))

    def contains(self, indices: np.ndarray) -> np.ndarray:
        idx = np.asarray(indices, np.int64)
        return ((self.bits[idx >> 3] >> (7 - (idx & 7))) & 1).astype(bool)

    def indices(self) -> np.ndarray:
        return np.nonzero(np.unpackbits(self.bits, count=self.total))[0].astype(np.int64)

    def __len__(self) -> int:
        return int(np.bitwise_count(self.bits).sum())

    def __and__(self, other: SampleSet) -> SampleSet:
        return SampleSet(self.total, self.bits & other._same(self).bits)

    def __or__(self, other: SampleSet) -> SampleSet:
        return SampleSet(self.total, self.bits | other._same(self).bits)

    def __sub__(self, other: SampleSet) -> SampleSet:
        return SampleSet(self.total, self.bits & ~other._same(self).bits)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, SampleSet) and other.total == self.total
                and bool(np.array_equal(other.bits, self.bits)))

    def _same(self, other: SampleSet) -> SampleSet:
        if self.total != other.total:
            raise ValueError(f"sample sets over {self.total} and {other.total} sequences")
        return self

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez_compressed(buf, total=np.int64(self.total), bits=self.bits)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> SampleSet:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return cls(int(z["total"]), z["bits"])

    def __repr__(self) -> str:
        return f"SampleSet({len(self)} of {self.total})"
