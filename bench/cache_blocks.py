"""What Ray Data's block splitting costs an epoch read from the label cache.

    python -m bench.cache_blocks [--rows 2048] [--seq-len 256] [--repeats 2]

Ray Data asks a source for 200 blocks at least and splits each block a read task yields
into pieces until it has them; the label cache makes one read task per 32 shards, so a
cache of fewer than 6400 shards (51200 rows in teacher batches of 8) reached the
students as one-row blocks. `raykd.data.cache_source.read_cache` asks for one block,
so nothing is split (and Ray Data joins a read task's shards into blocks of up to 128
MiB). This reads the same cache both ways, in turn, into
two consumers of a streaming split (Ray Train's mechanism) that only count rows: the
data path's own ceiling, with no training to hide it. Prints rows/s and its ratio.

The cache is synthetic (random top-k labels of the compact encoding, a teacher batch
of 8 rows a shard): reading it does not depend on how the labels were made.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from bench.common import report

VOCAB = 49152  # SmolLM2's


def fill(uri: str, rows: int, seq_len: int, top_k: int, batch: int) -> tuple[object, int]:
    from raykd.data.label_cache import LabelCache, Lineage

    lineage = Lineage(teacher="bench", tokenizer="bench", dataset="bench", seq_len=seq_len,
                      top_k=top_k, temperature=1.0, encoding="compact", dtype="float32",
                      vocab_limit=None)
    cache = LabelCache(uri, lineage).open()
    rng = np.random.default_rng(0)
    for start in range(0, rows, batch):
        ids = np.arange(start, min(rows, start + batch), dtype=np.int64)
        n = len(ids)
        top = rng.integers(0, VOCAB, (n, seq_len, top_k)).astype(np.uint16)
        cache.write_shard({
            "sample_id": ids * 7919, "sample_index": ids,
            "input_ids": rng.integers(0, VOCAB, (n, seq_len)).astype(np.int32),
            "length": np.full(n, seq_len, np.int32),
            "topk_q": rng.integers(0, 256, (n, seq_len, top_k)).astype(np.uint8),
            "topk_id_planes": np.stack([top & 0xFF, top >> 8], axis=2).astype(np.uint8)})
    return lineage, -(-rows // batch)


def epoch(ds, consumers: int, batch: int) -> tuple[float, int]:
    """Seconds to stream every row of `ds` to `consumers` actors, and the rows they saw."""
    import ray

    @ray.remote(num_cpus=0.5)
    class Consumer:
        def count(self, it) -> int:
            n = 0
            for b in it.iter_torch_batches(batch_size=batch):
                n += len(b["sample_index"])
            return n

    actors = [Consumer.remote() for _ in range(consumers)]
    ray.get([a.__ray_ready__.remote() for a in actors])
    start = time.perf_counter()
    seen = sum(ray.get([a.count.remote(it) for a, it in
                        zip(actors, ds.streaming_split(consumers, equal=True))]))
    seconds = time.perf_counter() - start
    for a in actors:
        ray.kill(a)
    return seconds, seen


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    import ray
    import ray.data

    from raykd.data.cache_source import CacheSource, read_cache
    from raykd.data.samples import SampleSet

    with tempfile.TemporaryDirectory(prefix="raykd-cache-blocks-") as out:
        lineage, shards = fill(f"{out}/cache", args.rows, args.seq_len, args.top_k, 8)
        every = SampleSet.of(args.rows, np.arange(args.rows))
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        ways = {  # Ray Data's default parallelism (200 blocks), and the pipeline's
            "split": lambda s: ray.data.read_datasource(CacheSource(f"{out}/cache", lineage,
                                                                    every, s)),
            "joined": lambda s: read_cache(f"{out}/cache", lineage, every, s)}
        blocks = {name: sum(len(b.blocks) for b in make(0).iter_internal_ref_bundles())
                  for name, make in ways.items()}
        seconds: dict[str, list[float]] = {name: [] for name in ways}
        for r in range(args.repeats):
            for name in (ways if r % 2 == 0 else reversed(list(ways))):
                s, seen = epoch(ways[name](r), consumers=2, batch=8)
                assert seen == args.rows, (name, seen)
                seconds[name].append(s)
                print(f"{name}: {args.rows / s:.0f} rows/s", flush=True)
        ray.shutdown()
    rate = {name: args.rows * len(v) / sum(v) for name, v in seconds.items()}
    report("cache_blocks", {
        "rows": args.rows, "seq_len": args.seq_len, "top_k": args.top_k, "shards": shards,
        "blocks_delivered": blocks, "seconds": seconds,
        "rows_per_s": {k: round(v) for k, v in rate.items()},
        "joined_over_split": round(rate["joined"] / rate["split"], 3)})


if __name__ == "__main__":
    main()
