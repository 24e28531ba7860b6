"""Ray Data pieces around the label cache: a lazy source that reads cached labels, a
write-through stage, and an id filter.

`CacheSource` decides what to read when Ray Data *executes* it, not when the dataset is
built: the dataset of a later epoch is built before the first epoch has written the
cache, and each execution (each epoch) lists the shards afresh.
"""

from __future__ import annotations

import functools
from typing import Any, Iterator

import numpy as np

from raykd.data.label_cache import LabelCache, Lineage
from raykd.errors import UserError

try:
    from ray.data.datasource import Datasource
except ImportError:  # pragma: no cover - ray is a hard dependency
    Datasource = object  # type: ignore[misc,assignment]


class CacheSource(Datasource):  # type: ignore[misc,valid-type]
    """Rows of `wanted` sample ids, each exactly once, read from the cache's shards."""

    def __init__(self, uri: str, lineage: Lineage, wanted: np.ndarray):
        self.uri = uri
        self.lineage = lineage
        self.wanted = np.unique(wanted)

    def get_name(self) -> str:
        return "LabelCache"

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[Any]:
        from ray.data.block import BlockMetadata
        from ray.data.datasource import ReadTask

        cache = LabelCache(self.uri, self.lineage)
        selection = cache.index().selection(self.wanted)
        found = sum(len(rows) for _, rows in selection)
        groups = [selection[i::max(1, parallelism)] for i in range(max(1, parallelism))]
        tasks = []
        if found != len(self.wanted):
            # Ray Data also calls this early, only for metadata, when the cache may still be
            # filling; so the shortfall fails the read, not the planning.
            message = (f"labels.cache: {len(self.wanted) - found} of {len(self.wanted)} "
                       f"samples are missing from {self.uri}; rerun to label them again")
            meta = BlockMetadata(num_rows=0, size_bytes=0, exec_stats=None, input_files=None)
            tasks.append(ReadTask(functools.partial(_missing, message), meta))
        for group in groups:
            if not group:
                continue
            rows = sum(len(r) for _, r in group)
            meta = BlockMetadata(num_rows=rows, size_bytes=None, exec_stats=None,
                                 input_files=tuple(p for p, _ in group))
            tasks.append(ReadTask(functools.partial(_read, self.uri, self.lineage, group), meta))
        return tasks


def _missing(message: str) -> Iterator[Any]:
    raise UserError(message)
    yield  # a generator, like every read function


def _read(uri: str, lineage: Lineage, group: list[tuple[str, np.ndarray]]) -> Iterator[Any]:
    from ray.data.block import BlockAccessor

    cache = LabelCache(uri, lineage)
    for path, rows in group:
        yield BlockAccessor.batch_to_block(cache.read_shard(path, rows))


class ShardWriter:
    """Ray Data UDF: writes each block it sees as one cache shard, passes it on unchanged."""

    def __init__(self, uri: str, lineage: Lineage):
        self.uri = uri
        self.lineage = lineage

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if len(batch["sample_id"]):
            _cache(self.uri, self.lineage).write_shard(batch)
        return batch


@functools.lru_cache(maxsize=4)
def _cache(uri: str, lineage: Lineage) -> LabelCache:
    return LabelCache(uri, lineage)


class KeepIds:
    """Ray Data UDF: keeps rows whose sample_id is in a sorted id array (an ObjectRef,
    fetched once per worker process)."""

    def __init__(self, ids_ref: Any):
        self.ids_ref = ids_ref

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keep = np.isin(batch["sample_id"], _ids(self.ids_ref), assume_unique=False)
        return {k: v[keep] for k, v in batch.items()}


@functools.lru_cache(maxsize=8)
def _ids(ref: Any) -> np.ndarray:
    import ray

    return ray.get(ref)
