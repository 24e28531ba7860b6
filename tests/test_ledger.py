"""Sample bitmaps and the consumed-sample ledger (no Ray)."""

from __future__ import annotations

import numpy as np

from raykd.data.samples import Layout, SampleSet
from raykd.student.ledger import Ledger, candidates, fresh_rows


def test_sample_set_operations_and_round_trip():
    a = SampleSet.of(20, [0, 3, 7, 8, 19])
    b = SampleSet.of(20, [3, 4, 19])
    assert len(a) == 5 and a.contains(np.array([3, 4, 19])).tolist() == [True, False, True]
    assert (a & b).indices().tolist() == [3, 19]
    assert (a | b).indices().tolist() == [0, 3, 4, 7, 8, 19]
    assert (a - b).indices().tolist() == [0, 7, 8]
    assert SampleSet.from_bytes(a.to_bytes()) == a
    a.add(np.array([3, 3, 5]))  # idempotent, repeats fine
    assert a.indices().tolist() == [0, 3, 5, 7, 8, 19]


def test_a_hundred_million_samples_fit_in_megabytes():
    s = SampleSet(100_000_000)
    s.add(np.arange(0, 100_000_000, 3))
    assert s.bits.nbytes == 12_500_000
    assert len(s) == 33_333_334
    assert len(s.to_bytes()) < 2_000_000  # compressed on disk


def test_layout_numbers_files_densely():
    layout = Layout(np.array([3, 0, 5]))
    assert layout.offsets.tolist() == [0, 3, 3] and layout.total == 8


def test_ledger_round_trip():
    ledger = Ledger(100)
    ledger.epoch(0).add(np.arange(100))
    ledger.rows[0] = 100
    ledger.epoch(1).add(np.array([5, 6]))
    ledger.rows[1] = 2
    back = Ledger.from_bytes(ledger.to_bytes())
    assert back.samples == ledger.samples and back.rows == {0: 100, 1: 2}


def test_duplicates_are_trained_once_by_the_lowest_rank():
    ledger = Ledger(50)
    ledger.epoch(0).add(np.array([1]))  # trained before a restart
    valid = np.array([True, True, True])
    rank0 = np.array([1, 2, 3])  # 1 is already done
    rank1 = np.array([3, 4, 4])  # 3 arrives at rank 0 in the same step; 4 twice in a batch
    gathered = np.stack([candidates(ledger, 0, rank0, valid, 3),
                         candidates(ledger, 0, rank1, valid, 3)])
    keep0 = fresh_rows(ledger, 0, rank0, valid, gathered, 0)
    keep1 = fresh_rows(ledger, 0, rank1, valid, gathered, 1)
    assert keep0.tolist() == [False, True, True]
    assert keep1.tolist() == [False, True, False]
