"""Ray Data pieces around the label cache: a lazy source that reads cached labels and a
write-through stage.

`CacheSource` lists the cache when Ray Data *executes* it, not when the dataset is built:
the dataset of a later epoch is built before the first epoch has written the cache, and
each execution (each epoch) lists the shards afresh. Each read task keeps only the rows
in `wanted`. With a seed, shards are read in a seeded order and the rows of a window of
consecutive shards (up to MIX_BYTES of them) are shuffled together: a shard is one teacher
batch, and reordering whole shards alone would hand every later epoch the first epoch's
batches again, the same samples side by side in each step. No label goes through a
global shuffle, and a read task holds one window at a time, whatever the dataset's size.
Rows the cache lacks, or holds twice (a retried teacher batch), are the
train loop's to notice: it trains each sample once per epoch and checks at the end of the
epoch that none is missing (raykd.student.ledger).
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from raykd.data.label_cache import LabelCache, Lineage

try:
    from ray.data.datasource import Datasource
except ImportError:  # pragma: no cover - ray is a hard dependency
    Datasource = object  # type: ignore[misc,assignment]


SHARDS_PER_READ_TASK = 32
# The most bytes of rows a read task holds to mix: all its shards (at most
# SHARDS_PER_READ_TASK) of the quickstart's small batches, 2-3 of a large teacher's
# (32 x 2048 tokens of top-64 labels: ~25 MB a shard).
MIX_BYTES = 64 << 20


class CacheSource(Datasource):  # type: ignore[misc,valid-type]
    """Cached rows whose sample_index is in `wanted` (a SampleSet or an ObjectRef to one)."""

    def __init__(self, uri: str, lineage: Lineage, wanted: Any, seed: int | None = None):
        self.uri = uri
        self.lineage = lineage
        self.wanted = wanted
        self.seed = seed

    def get_name(self) -> str:
        return "LabelCache"

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[Any]:
        from ray.data.block import BlockMetadata
        from ray.data.datasource import ReadTask

        paths = LabelCache(self.uri, self.lineage).shard_paths()
        if self.seed is not None:
            paths = [paths[i] for i in np.random.default_rng(self.seed).permutation(len(paths))]
        # A read task is a worker process, often a freshly started one (Ray ends idle
        # task workers quickly when many actors are alive), and a shard is one teacher
        # batch: one task per shard spent more CPU on Python start-up than on reading.
        # The count is the cache's, not `parallelism`: see `read_cache`.
        n = max(1, -(-len(paths) // SHARDS_PER_READ_TASK))
        tasks = []
        for group in (paths[i::n] for i in range(n)):
            if group:
                meta = BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None,
                                     input_files=tuple(group))
                tasks.append(ReadTask(functools.partial(
                    _read, self.uri, self.lineage, group, self.wanted, self.seed), meta))
        return tasks


def read_cache(uri: str, lineage: Lineage, wanted: Any, seed: int | None = None) -> Any:
    """A dataset of the cached rows in `wanted`.

    Ray Data asks a source for at least `read_op_min_num_blocks` (200) blocks and, when it
    returns fewer read tasks, splits each block a task yields into that many pieces: a
    cache of fewer than 200 x SHARDS_PER_READ_TASK shards reached the students as blocks
    of one row or none, each its own object and hand-off (bench.cache_blocks measures
    what that cost). One requested block is never more than the tasks the source makes,
    so nothing is split (CacheSource sizes its tasks by the cache alone), and Ray Data
    joins a task's shards into blocks of up to its target block size (128 MiB)."""
    import ray.data

    return ray.data.read_datasource(CacheSource(uri, lineage, wanted, seed),
                                    override_num_blocks=1)


def _read(uri: str, lineage: Lineage, paths: list[str], wanted: Any,
          seed: int | None = None) -> Iterator[Any]:
    from raykd.data.packing import _resolve

    cache = LabelCache(uri, lineage)
    keep = _resolve(wanted)
    window: list[dict[str, np.ndarray]] = []
    held = 0
    for i, path in enumerate(paths):
        rows = cache.read_shard(path, keep)
        if len(rows["sample_index"]):
            window.append(rows)
            held += sum(v.nbytes for v in rows.values())
        if seed is None or held >= MIX_BYTES or i == len(paths) - 1:
            # Seeded by the window's last shard too, so each window has its own order.
            yield from _mixed(window, None if seed is None else
                              np.random.default_rng([seed, zlib.crc32(path.encode())]))
            window, held = [], 0


def _mixed(window: list[dict[str, np.ndarray]],
           rng: np.random.Generator | None) -> Iterator[Any]:
    """The window's rows as blocks of its shards' sizes, the rows shuffled across all of
    them when `rng` is given."""
    from ray.data.block import BlockAccessor

    if not window:
        return
    rows = {k: np.concatenate([w[k] for w in window]) for k in window[0]}
    if rng is not None:
        order = rng.permutation(len(rows["sample_index"]))
        rows = {k: v[order] for k, v in rows.items()}
    rows["from_cache"] = np.ones(len(rows["sample_index"]), dtype=np.int8)
    at = 0
    for w in window:
        n = len(w["sample_index"])
        yield BlockAccessor.batch_to_block({k: v[at:at + n] for k, v in rows.items()})
        at += n


class ShardWriter:
    """Ray Data UDF (an actor): writes each block it sees as one cache shard, passes it on
    unchanged."""

    def __init__(self, uri: str, lineage: Lineage):
        self.cache = LabelCache(uri, lineage)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if len(batch["sample_index"]):
            # from_cache says where a training row came from; a shard needs no such column.
            self.cache.write_shard({k: v for k, v in batch.items() if k != "from_cache"})
        return batch
