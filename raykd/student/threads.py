"""A CPU student's torch threads: its own CPUs, then the teacher's once the pool is done.

Where teacher replicas and students share a node (embedded Ray on a laptop, a CPU node
holding both), the replicas' cores idle once the pool has labelled what the epoch needs:
the rest of the run is the students' alone (queued labels, then the label cache). Every
few seconds each CPU worker asks the run's PoolStats (raykd.telemetry) how many CPUs the
current labelling pass's replicas held on its node, once that pass has labelled all its
rows, and runs torch on its share of them too. A new pass (a worker-group restart) starts
with nothing labelled, so the workers drop back to their own CPUs until it is done.

Ray still counts the idle replicas' CPUs as theirs until the epoch's dataset ends; the
threads only use cores that Ray's own accounting gave to a teacher with nothing left to do.
"""

from __future__ import annotations

import os
import time
from typing import Any

from raykd import telemetry


class StudentThreads:
    """Sets torch's thread count between steps; `now` is the current count."""

    def __init__(self, stats_name: str | None, own: int, workers_on_node: int,
                 enabled: bool = True, every_s: float = 5.0):
        import ray

        self.own = self.now = max(1, own)
        self.actor = telemetry.find(stats_name) if enabled else None
        self.node = ray.get_runtime_context().get_node_id() if self.actor is not None else ""
        self.workers_on_node = max(1, workers_on_node)
        # Never more threads than the node has cores for each worker on it.
        self.most = max(self.own, len(os.sched_getaffinity(0)) // self.workers_on_node)
        self.every_s = every_s
        self.polled = float("-inf")
        self.raised_at: float | None = None  # when the teacher's CPUs were first taken

    def update(self, teacher_may_run: bool = False, force: bool = False) -> int:
        """At most every `every_s` (or now, with `force`): own CPUs + this worker's share
        of the idle teacher's. teacher_may_run: the epoch streams from a pool PoolStats
        does not track (a later epoch with no label cache): keep to the worker's own."""
        if self.actor is None:
            return self.now
        now = time.monotonic()
        if now - self.polled < self.every_s and not force:
            return self.now
        self.polled = now
        idle = 0.0 if teacher_may_run else self._idle_cpus()
        want = min(self.most, self.own + int(idle // self.workers_on_node))
        if want != self.now:
            import torch

            torch.set_num_threads(want)
            if want > self.own and self.raised_at is None:
                self.raised_at = time.time()
            self.now = want
        return self.now

    def _idle_cpus(self) -> float:
        import ray

        try:
            return float(ray.get(self.actor.idle_cpus.remote(self.node), timeout=5.0))
        except Exception:  # noqa: BLE001 - telemetry must never fail a run
            return 0.0


def for_worker(plan: dict[str, Any], train: Any, workers_on_node: int) -> StudentThreads | None:
    """The worker's StudentThreads, or None when it trains on GPU."""
    if train.use_gpu:
        return None
    return StudentThreads(plan.get("stats"), int(train.cpus_per_worker), workers_on_node,
                          enabled=train.reuse_teacher_cpus)
