"""What the teacher pool is doing, for the progress lines and metrics.jsonl.

Teacher replicas live inside Ray Data's actor pool, out of reach of the driver and the
Train workers, so each replica reports every labelled batch to one small named actor per
run (fire-and-forget: a replica never waits on it). Rank 0 of the students and the
driver's progress printer read it.

    TeacherReplica --hello(replica, node, cpus, pass_id)-->
                   --add(replica, rows, tokens, busy_s, pass_id, first)--> PoolStats
    FirstEpoch (each worker-group start) --expect(rows)-->      PoolStats
    PoolStats <--snapshot()-- rank 0, Follower     PoolStats <--idle_cpus(node)-- workers

`expect` and `idle_cpus` let CPU students use the teacher's cores once it is done (see
raykd.student.threads).
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

NAMESPACE = "raykd"


def stats_name(run_name: str, started: float) -> str:
    # The start time keeps two runs with the same name on one cluster apart.
    return f"raykd-pool-{run_name}-{int(started * 1000)}"


class PoolStats:
    """Counters of one run's teacher pool (a Ray actor, 0 CPUs)."""

    def __init__(self) -> None:
        self.rows = 0
        self.tokens = 0
        self.busy_s = 0.0
        self.replicas: dict[str, float] = {}  # replica actor id -> last report time
        self.started = time.time()
        # The labelling pass of the current worker-group (re)start (raykd.student.threads):
        # its id, the rows it must label, those labelled so far, and its replicas' CPUs by
        # node. Reports carry the pass id of the pool that made them: an earlier pool's
        # late batches (after a restart) do not count towards the current pass.
        self.current = 0  # 0: no pass announced
        self.expected = 0
        self.pass_rows = 0
        self.cpus: dict[str, dict[str, float]] = {}  # node id -> replica id -> CPUs
        self.batches: set[int] = set()  # the first sample_index of each batch counted
        self.unannounced = False  # a pool runs whose pass was never announced

    def add(self, replica: str, rows: int, tokens: int, busy_s: float,
            pass_id: int | None = None, first: int | None = None) -> None:
        """One labelled batch. first: its first row's sample_index, so that a batch
        labelled again (a block retried after a replica died) counts once in its pass."""
        self.rows += rows
        self.tokens += tokens
        self.busy_s += busy_s
        self.replicas[replica] = time.time()
        self._note_unannounced(pass_id)
        # A retried block is labelled again in the same batches (Ray Data retries an
        # actor task with the same input). Were it re-batched otherwise, its rows would
        # count twice, and the workers would take the cores a batch early, as without
        # `first`. Once the pass is done no report changes the answer: nothing is kept.
        if self._in_pass(pass_id) and (first is None or first not in self.batches):
            self.pass_rows += rows
            if first is not None and self.pass_rows < self.expected:
                self.batches.add(first)

    def hello(self, replica: str, node: str = "", cpus: float = 0.0,
              pass_id: int | None = None) -> None:
        self.replicas.setdefault(replica, time.time())
        self._note_unannounced(pass_id)
        if self._in_pass(pass_id) and node:
            self.cpus.setdefault(node, {})[replica] = cpus

    def expect(self, rows: int) -> int:
        """A new labelling pass of `rows` rows starts: its id, for its replicas' reports."""
        self.current += 1
        self.expected, self.pass_rows, self.cpus, self.batches = rows, 0, {}, set()
        self.unannounced = False
        return self.current

    def idle_cpus(self, node: str) -> float:
        """The CPUs the current pass's replicas hold on `node` once it has labelled all its
        rows, else 0. A batch reported without `first` counts each time it is reported."""
        if self.current == 0 or self.unannounced or self.pass_rows < self.expected:
            return 0.0
        return float(sum(self.cpus.get(node, {}).values()))

    def _in_pass(self, pass_id: int | None) -> bool:
        """Whether a report belongs to the current pass. None: a pool outside the passes
        (the held-out set's, a later epoch's without a cache)."""
        return pass_id is not None and pass_id == self.current

    def _note_unannounced(self, pass_id: int | None) -> None:
        """A negative id: a pool whose announcement failed. It holds the teacher's CPUs
        until the next pass, so none are idle before it."""
        if pass_id is not None and pass_id < 0:
            self.unannounced = True

    def snapshot(self) -> dict[str, Any]:
        return {"time": time.time(), "rows": self.rows, "tokens": self.tokens,
                "busy_s": self.busy_s, "replicas": _alive(list(self.replicas))}


def _alive(actor_ids: list[str]) -> int:
    """How many of these actors are alive, from the GCS actor table (Ray's state API
    needs the dashboard, which embedded runs leave off)."""
    if not actor_ids:
        return 0
    try:
        from ray._private import state

        table = state.actors()
        return sum(1 for a in actor_ids if table.get(a, {}).get("State") == "ALIVE")
    except Exception:  # noqa: BLE001 - a private API may move; then count who reported
        return len(actor_ids)


def start(name: str) -> Any:
    """The run's PoolStats actor (created, or found after a driver restart)."""
    import ray

    actor = ray.remote(num_cpus=0, max_restarts=0)(PoolStats)
    return actor.options(name=name, namespace=NAMESPACE, get_if_exists=True,
                         lifetime=None).remote()


def find(name: str | None) -> Any:
    """The PoolStats actor `name`, or None (a replica outside a run, e.g. in a benchmark)."""
    if not name:
        return None
    import ray

    try:
        return ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return None


def stop(actor: Any) -> None:
    if actor is not None:
        import ray

        ray.kill(actor)


def expect(name: str | None, rows: int, timeout_s: float = 5.0) -> int | None:
    """Announce to the run's PoolStats a labelling pass of `rows` rows: the pass id for its
    replicas to report under, None without a PoolStats, -1 if the announcement failed."""
    if not name:
        return None
    try:
        actor = find(name)
        if actor is None:
            return None
        import ray

        return int(ray.get(actor.expect.remote(rows), timeout=timeout_s))
    except Exception:  # noqa: BLE001 - telemetry must never fail a run
        return -1


def snapshot(actor: Any, timeout_s: float = 5.0) -> dict[str, Any] | None:
    if actor is None:
        return None
    import ray

    try:
        return ray.get(actor.snapshot.remote(), timeout=timeout_s)
    except Exception:  # noqa: BLE001 - telemetry must never fail a run
        return None


class Rate:
    """Teacher tokens/s over the last `window_s` seconds of snapshots (a single second
    between two polls often holds no finished batch, and would read 0)."""

    def __init__(self, window_s: float = 30.0) -> None:
        self.window_s = window_s
        self.history: deque[dict[str, Any]] = deque()

    def update(self, snap: dict[str, Any] | None) -> dict[str, float]:
        if snap is None:
            return {}
        out = {"teacher_tokens": float(snap["tokens"]), "replicas": float(snap["replicas"])}
        self.history.append(snap)
        while len(self.history) > 2 and snap["time"] - self.history[1]["time"] >= self.window_s:
            self.history.popleft()
        first = self.history[0]
        if snap["time"] > first["time"]:
            out["teacher_tokens_per_s"] = ((snap["tokens"] - first["tokens"])
                                           / (snap["time"] - first["time"]))
        return out
