"""A CPU student's torch threads: its own CPUs, then the teacher's once the pool is done.

Where teacher replicas and students share a node (embedded Ray on a laptop, a CPU node
holding both), the replicas' cores idle once the pool has labelled what the epoch needs:
the rest of the run is the students' alone (queued labels, then the label cache). Each
CPU worker asks the run's PoolStats (raykd.telemetry) how many CPUs the current
labelling pass's replicas held on its node, once that pass has labelled all its rows, and
runs torch on its share of them too. It asks after each step and reads the answer before
the next (at most once a second), so usually the step after the pool's last batch
already runs on the teacher's cores (if the answer is late, the one after). A new pass
(a worker-group restart) starts with nothing labelled, so the workers drop back to their
own CPUs until it is done; so do epochs labelled by a pool of their own (later epochs
without a label cache).

The threads keep those cores for the rest of the run. Ray frees the replicas' CPUs when
the first epoch's dataset ends, and may then schedule other work there (on embedded Ray,
the label cache's read tasks; on a shared cluster, other jobs): `train.reuse_teacher_cpus:
false` keeps each worker to its own CPUs. A run whose first epoch needs no teacher (all
cached, or resumed in a later epoch) starts no pool, and its workers keep their own.
"""

from __future__ import annotations

import os
import time
from typing import Any

from raykd import telemetry
from raykd.student.config import TrainConfig


class StudentThreads:
    """Sets torch's thread count between steps; `now` is the current count."""

    def __init__(self, stats_name: str | None, own: int, workers_on_node: int,
                 enabled: bool = True, every_s: float = 1.0, cores: int | None = None):
        import ray

        self.own = self.now = max(1, own)
        self.actor = telemetry.find(stats_name) if enabled else None
        self.node = ray.get_runtime_context().get_node_id() if self.actor is not None else ""
        self.workers_on_node = max(1, workers_on_node)
        if cores is None and self.actor is not None:
            cores = node_cores(self.node)
        # Never more threads than the node has cores for each worker on it.
        self.most = max(self.own, (cores or self.own) // self.workers_on_node)
        self.every_s = every_s
        self.polled = float("-inf")
        self.pending: Any = None  # an idle_cpus call in flight: steps never wait on it
        self.raised_at: float | None = None  # when the teacher's CPUs were first taken

    def update(self, teacher_may_run: bool = False, force: bool = False) -> int:
        """Own CPUs + this worker's share of the idle teacher's, from PoolStats' answer to
        the call sent by an earlier update (with `force`: a call sent now, and waited
        for). A new call goes out once the last is answered, at most every `every_s`; the
        train loop updates after each step and before the next, so with steps longer
        than `every_s` a step usually knows the state as of the end of the one before
        (a step whose answer is late knows it at the next).
        teacher_may_run: the epoch is labelled by a pool of its own, which PoolStats does
        not track (a later epoch without a label cache)."""
        import ray

        if self.actor is None:
            return self.now
        if teacher_may_run:
            return self._set(self.own)
        if force:
            self._send()  # an answer already in flight may predate what force must see
        threads = self.now
        if self.pending is not None:
            ready, _ = ray.wait([self.pending], timeout=5.0 if force else 0)
            if ready:
                try:
                    idle = float(ray.get(self.pending))
                except Exception:  # noqa: BLE001 - telemetry must never fail a run
                    idle = 0.0
                self.pending = None
                threads = self._set(min(self.most,
                                        self.own + int(idle // self.workers_on_node)))
        if self.pending is None and time.monotonic() - self.polled >= self.every_s:
            self._send()  # answered by the next update, without a step waiting on it
        return threads

    def _send(self) -> None:
        self.pending = self.actor.idle_cpus.remote(self.node)
        self.polled = time.monotonic()

    def _set(self, threads: int) -> int:
        if threads != self.now:
            import torch

            torch.set_num_threads(threads)
            if threads > self.own and self.raised_at is None:
                self.raised_at = time.time()
            self.now = threads
        return self.now


def node_cores(node: str) -> int:
    """The cores a worker here may use: this process's CPU affinity (os.cpu_count where
    there is none, as on macOS), and no more than the CPUs Ray gives `node` (on a
    Kubernetes pod, its CPU limit)."""
    import ray

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)
    ray_cpus = next((n.get("Resources", {}).get("CPU") for n in ray.nodes()
                     if n.get("NodeID") == node), None)
    return min(cores, int(ray_cpus)) if ray_cpus else cores


def for_worker(plan: dict[str, Any], train: TrainConfig, colocated: bool,
               workers_on_node: int) -> StudentThreads | None:
    """The worker's StudentThreads; None on GPU, or with a co-located teacher (no pool)."""
    if train.use_gpu or colocated:
        return None
    return StudentThreads(plan.get("stats"), int(train.cpus_per_worker), workers_on_node,
                          enabled=train.reuse_teacher_cpus)
