"""The train loop's collectives across two real gloo ranks (two processes on 127.0.0.1):
every rank must join the same collectives, whatever rows its own data gave it."""

from __future__ import annotations

import datetime
import os

import pytest
import torch.multiprocessing as mp

from tests.ports import free_ports


def _last_window(rank: int, port: int, samples: list[int], out: dict) -> None:
    import torch
    import torch.distributed as dist

    from raykd.student.checkpoint import Progress
    from raykd.student.ledger import Ledger
    from raykd.student.train_loop import Window, _last_window_metrics

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # A short timeout: a rank left alone in a collective fails the test instead of hanging.
    dist.init_process_group("gloo", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=30))
    try:
        window = Window(tokens=10.0 * samples[rank], samples=samples[rank])
        progress = Progress(ledger=Ledger(8))
        metrics = _last_window_metrics(window, 0.1, torch.device("cpu"), progress)
        # Both ranks go on to the next collective, as the loop does (its final evaluation).
        after = torch.tensor([rank + 1.0])
        dist.all_reduce(after)
        out[rank] = (metrics.get("samples"), float(after.item()))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("samples", [[3, 0], [0, 0], [2, 5]])
def test_the_epochs_last_window_is_decided_by_all_ranks(samples):
    """Ranks run the same micro-batches, but one can end an epoch on real rows while the
    other has only empty ones: deciding alone whether to report put the two in different
    collectives (a gloo size mismatch ended a resumed two-worker run)."""
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_last_window, args=(free_ports(1)[0], samples, out), nprocs=2, join=True)
        got = dict(out)
    want = sum(samples) or None
    assert got == {0: (want, 3.0), 1: (want, 3.0)}
