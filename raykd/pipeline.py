"""The Ray Data side of a job: packed sequences, the teacher pool, the label cache.

    files --read_binary_files--> PackFiles (only the samples still to do) --> TeacherReplica
          pool --> ShardWriter (write-through) ------------------------------+
    CacheSource (samples already labelled) ----------------------------------+--> students

With data.shuffle (the default) every epoch has a seeded random order (`shuffle_seed`):
the first shuffles the packed token ids before the teacher, later ones read the cache's
shards in another order. Without it the students would see the files one after another,
and end every epoch on the last file.

`plan()` runs the cheap passes on the driver before any run directory exists (so bad data
fails fast): it packs every file once to number all sequences and split them, labels (or
reads from the cache) the held-out set, and opens the cache. `first_epoch()` then reads
what the cache holds and sends only the rest through the teacher, skipping what a
checkpoint's ledger says was already trained on; `later_epochs()` reads the cache alone,
so a second epoch, or a second run with the same lineage, starts no teacher.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from raykd.config import JobConfig
from raykd.data.cache_source import ShardWriter, read_cache
from raykd.data.label_cache import (
    LabelCache,
    Lineage,
    dataset_fingerprint,
    model_fingerprint,
    tokenizer_fingerprint,
)
from raykd.data.packing import PackFiles, PackSpec, empty_sequences
from raykd.data.samples import Layout, SampleSet
from raykd.errors import UserError
from raykd.preflight import Preflight
from raykd.storage import FileSet, is_remote, local_path
from raykd.teacher.replica import TeacherReplica, resolve_dtype, resolved


@dataclass
class DataPlan:
    files: FileSet
    spec: PackSpec
    layout: Layout  # every packed sequence's dense sample_index
    train: SampleSet  # the training split
    eval_rows: dict[str, np.ndarray]  # labelled held-out sequences, by sample_index
    cache: LabelCache | None
    cached: SampleSet  # training samples the cache held when planned
    eval_from_cache: bool
    vocab_limit: int | None  # logits compared over this many tokens (student.vocab)
    stats: str | None = None  # the run's PoolStats actor (raykd.telemetry), once started


def plan(job: JobConfig, checks: Preflight, model_dir: str, on_cluster: bool,
         log: Callable[[str], None]) -> DataPlan:
    files = checks.files
    spec = pack_spec(job, files)
    stats = collect(_read(files).map_batches(PackFiles(spec, "stats"), batch_size=1,
                                             batch_format="numpy"), None)
    order = np.argsort(stats["file_idx"])
    layout = Layout(stats["count"][order].astype(np.int64))
    held_mask = np.concatenate(
        [np.unpackbits(np.frombuffer(stats["eval_bits"][i], np.uint8), count=int(n))
         for i, n in zip(order, layout.counts)] or [np.zeros(0, np.uint8)]).astype(bool)
    held = SampleSet.of(layout.total, np.nonzero(held_mask)[0])
    train = SampleSet.of(layout.total, np.nonzero(~held_mask)[0])
    too_few = (f"data.source: {len(files.paths)} file(s) pack into only {layout.total} "
               f"sequence(s) of {job.data.seq_len} tokens")
    if len(train) == 0:
        raise UserError(f"{too_few}, none left for training after data.eval_fraction="
                        f"{job.data.eval_fraction}; add data or lower data.seq_len")
    chosen = held.indices()[: job.data.eval_max_samples]
    if len(chosen) == 0:
        raise UserError(f"{too_few}, none held out for evaluation at data.eval_fraction="
                        f"{job.data.eval_fraction}; add data or raise data.eval_fraction")
    cache = None
    uri = _cache_location(job, files, model_dir, checks, on_cluster, log)
    if uri is not None:
        cache = LabelCache(uri, lineage(job, files, model_dir, checks.vocab_limit)).open()
    p = DataPlan(files, spec, layout, train, {}, cache, SampleSet(layout.total), False,
                 checks.vocab_limit)
    p.eval_rows, p.eval_from_cache = _eval_rows(job, p, SampleSet.of(layout.total, chosen),
                                                on_cluster)
    if cache is not None:
        p.cached = cache.index().cached(layout.total) & train
        log(f"raykd: label cache {cache.uri}: {len(p.cached)} of {len(train)} training "
            "sequences already labelled")
    return p


def pack_spec(job: JobConfig, files: FileSet) -> PackSpec:
    return PackSpec(teacher_model=job.teacher.model, names=dict(zip(files.paths, files.names)),
                    file_index={p: i for i, p in enumerate(files.paths)}, fmt=job.data.format,
                    text_key=job.data.text_key, seq_len=job.data.seq_len,
                    eval_fraction=job.data.eval_fraction)


def lineage(job: JobConfig, files: FileSet, model_dir: str, vocab_limit: int | None) -> Lineage:
    source = job.teacher.model
    teacher_path = model_dir if not source.lower().endswith(".gguf") else local_path(source)
    return Lineage(
        teacher=model_fingerprint(teacher_path),
        tokenizer=tokenizer_fingerprint(model_dir),
        dataset=dataset_fingerprint(files, job.data.format, job.data.text_key),
        seq_len=job.data.seq_len,
        top_k=job.labels.top_k,
        temperature=job.labels.temperature,
        encoding=job.labels.encoding,
        dtype=resolve_dtype(job.teacher),
        vocab_limit=vocab_limit,
        tail_samples=job.labels.tail_samples,
    )


def _cache_location(job: JobConfig, files: FileSet, model_dir: str, checks: Preflight,
                    on_cluster: bool, log: Callable[[str], None]) -> str | None:
    """Where this job's label cache lives, or None. On a multi-node cluster, shards are
    written and read by tasks on any node, so `auto` (a path on the driver's disk) would
    scatter them: caching is then off unless labels.cache names shared storage."""
    if job.labels.cache is None or job.teacher.colocated:  # co-located: nothing to cache
        return None
    if job.labels.cache == "auto" and on_cluster and not is_remote(job.run.output_dir):
        import ray

        if sum(1 for n in ray.nodes() if n["Alive"]) > 1:
            log("raykd: labels.cache: auto would be a local path on a multi-node cluster; "
                "caching is off (set labels.cache to s3://... or a shared filesystem)")
            return None
    return cache_uri(job, lineage(job, files, model_dir, checks.vocab_limit))


def cache_uri(job: JobConfig, lin: Lineage) -> str:
    """labels.cache: auto -> <output_dir>/label-cache/<lineage key>."""
    if job.labels.cache == "auto":
        return os.path.abspath(os.path.join(job.run.output_dir, "label-cache", lin.key()))
    return job.labels.cache


# --------------------------------------------------------------------------- datasets


def _read(files: FileSet, only: list[str] | None = None) -> Any:
    import ray.data

    paths = only if only is not None else files.paths
    return ray.data.read_binary_files(paths, include_paths=True, filesystem=files.fs,
                                      override_num_blocks=len(paths))


def shuffle_seed(job: JobConfig, epoch: int | None) -> int | None:
    """The seed of an epoch's data order, or None (file order) when data.shuffle is off.
    epoch None: the order all epochs after the first share (see `later_epochs`)."""
    if not job.data.shuffle:
        return None
    tag = 0 if epoch is None else epoch + 1
    return int(np.random.SeedSequence([job.run.seed % 2**63, tag]).generate_state(1)[0])


def sequences(p: DataPlan, split: str, keep: SampleSet | None = None,
              seed: int | None = None) -> Any:
    """Packed sequences of one split (only those in `keep` when given, and then only the
    files holding them are read): sample_id, sample_index, input_ids (seq_len,), length;
    in file order, or shuffled across all files with `seed`."""
    import ray

    only = None
    if keep is not None and len(keep) < p.layout.total:
        holders = np.unique(np.searchsorted(p.layout.offsets, keep.indices(), side="right") - 1)
        only = [p.files.paths[i] for i in holders] or p.files.paths[:1]  # nothing to keep
    keep_arg = ray.put(keep) if keep is not None else None
    pack = PackFiles(p.spec, split, p.layout.offsets, keep_arg)
    # One file per call: a sequence's id depends on its file alone (see data.packing).
    ds = _read(p.files, only).map_batches(pack, batch_size=1, batch_format="numpy")
    # A global shuffle waits for every file to be packed, but moves only token ids (a few
    # bytes a token, against ~134 for a label): the teacher and students still stream.
    return ds if seed is None else ds.random_shuffle(seed=seed)


def label(job: JobConfig, ds: Any, on_cluster: bool, vocab_limit: int | None,
          emit_nll: bool = False, pool: tuple[int, int] | None = None,
          stats: str | None = None, pass_id: int | None = None) -> Any:
    """Add soft-label columns with an autoscaling pool of teacher replicas (reporting to
    the PoolStats actor `stats`, under labelling pass `pass_id`)."""
    import ray.data

    lo, hi = pool or (job.teacher.replicas.min, job.teacher.replicas.max)
    # A file packs into one block of many sequences, and a map task emits its output only
    # once the input block is done. Re-blocking to one teacher batch per block (streaming,
    # no shuffle) lets labels flow to the students batch by batch.
    ds = ds.repartition(target_num_rows_per_block=job.teacher.batch_size)
    return ds.map_batches(
        TeacherReplica,
        fn_constructor_kwargs={"teacher": resolved(job.teacher), "labels": job.labels,
                               "emit_nll": emit_nll, "vocab_limit": vocab_limit,
                               "stats": stats, "pass_id": pass_id},
        compute=ray.data.ActorPoolStrategy(min_size=lo, max_size=hi),
        batch_size=job.teacher.batch_size,
        batch_format="numpy",
        num_cpus=job.teacher.num_cpus,
        num_gpus=job.teacher.num_gpus,
        resources=job.teacher.resources or None,
        label_selector=placement_labels(job.teacher.node_labels, on_cluster),
    )


@dataclass
class EpochRows:
    """The training rows of the first epoch of a (re)start (`todo`): those read from the
    label cache, and those sent through the teacher pool."""

    todo: SampleSet
    from_cache: SampleSet
    to_label: SampleSet


def first_epoch_rows(job: JobConfig, p: DataPlan, done: SampleSet | None = None) -> EpochRows:
    """All training rows but `done` (what the restored checkpoint already trained on):
    cached ones from the cache, the rest for the teacher (none when co-located: the
    students label their own batches)."""
    todo = p.train - done if done is not None else p.train
    nothing = SampleSet(p.layout.total)
    if job.teacher.colocated:
        return EpochRows(todo, nothing, nothing)
    if p.cache is None:
        return EpochRows(todo, nothing, todo)
    cached = p.cache.index().cached(p.layout.total)  # now: a restart finds what was written
    return EpochRows(todo, todo & cached, todo - cached)


def first_epoch(job: JobConfig, p: DataPlan, on_cluster: bool,
                done: SampleSet | None = None, epoch: int = 0,
                rows: EpochRows | None = None, pass_id: int | None = None) -> Any:
    """Training rows of the first epoch of a (re)start (`epoch`, its index): `rows`
    (first_epoch_rows), cached ones from the cache, the rest labelled now and written
    through to the cache. pass_id: the labelling pass the replicas report under
    (raykd.telemetry.PoolStats)."""
    import ray
    import ray.data

    rows = rows or first_epoch_rows(job, p, done)
    seed = shuffle_seed(job, epoch)
    keep = rows.todo if done is not None else None
    if job.teacher.colocated:  # the students label their own batches
        return sequences(p, "train", keep, seed)
    if p.cache is None:
        return label(job, sequences(p, "train", keep, seed), on_cluster, p.vocab_limit,
                     stats=p.stats, pass_id=pass_id)
    parts = []
    if len(rows.from_cache):
        parts.append(read_cache(p.cache.uri, p.cache.lineage, ray.put(rows.from_cache), seed))
    if len(rows.to_label) or not parts:
        keep = rows.to_label if (len(rows.from_cache) or done is not None) else None
        labelled = label(job, sequences(p, "train", keep, seed), on_cluster, p.vocab_limit,
                         stats=p.stats, pass_id=pass_id)
        parts.append(write_through(p.cache, labelled, job.teacher.replicas.max))
    return parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])


def later_epochs(job: JobConfig, p: DataPlan, on_cluster: bool) -> Any:
    """Training rows of every later epoch: the cache alone (filled by the first), or the
    teacher again when caching is off. One dataset serves them all, so they share one
    order: Ray Data's seeded shuffles repeat under Ray Train's streaming split."""
    import ray
    import ray.data

    seed = shuffle_seed(job, None)
    if job.teacher.colocated:
        return sequences(p, "train", seed=seed)
    if p.cache is None:
        return label(job, sequences(p, "train", seed=seed), on_cluster, p.vocab_limit,
                     stats=p.stats)
    return read_cache(p.cache.uri, p.cache.lineage, ray.put(p.train), seed)


def write_through(cache: LabelCache, labelled: Any, replicas_max: int = 1) -> Any:
    """One shard per teacher batch (each block is one), written by light long-lived
    actors beside the pool. Actors, not tasks: with more workers alive than CPUs (the
    pool, the students, Ray Train's and Ray Data's own actors) Ray ends an idle task
    worker after a second, so a write task per batch started a fresh Python process per
    batch, whose imports took a third of a core from the teacher and the students."""
    import ray.data

    return labelled.map_batches(ShardWriter, fn_constructor_args=(cache.uri, cache.lineage),
                                compute=ray.data.ActorPoolStrategy(min_size=1,
                                                                   max_size=replicas_max),
                                # No CPU reserved: a write is milliseconds of work a batch,
                                # and a reserved fraction could leave too little for the read
                                # task feeding the teacher on a small machine (a deadlock).
                                batch_size=None, batch_format="numpy", num_cpus=0)


# --------------------------------------------------------------------------- held-out set


def _eval_rows(job: JobConfig, p: DataPlan, chosen: SampleSet, on_cluster: bool
               ) -> tuple[dict[str, np.ndarray], bool]:
    """The held-out set (the first eval_max_samples held-out sequences in file order) with
    the teacher's soft labels and next-token NLL, as numpy columns by sample_index."""
    import ray.data

    if p.cache is not None:
        hit = p.cache.read_eval(chosen.indices())
        if hit is not None:
            return hit, True
    cols = collect(sequences(p, "eval", chosen), empty_sequences(job.data.seq_len))
    ds = ray.data.from_items([{k: v[i] for k, v in cols.items()}
                              for i in range(len(cols["sample_index"]))])
    if job.teacher.colocated:
        # Only the teacher's NLL is needed here: the students score their held-out KD
        # against their own teacher, and a full-vocabulary top_k would be ~100 KB a token.
        job = dataclasses.replace(job, labels=dataclasses.replace(
            job.labels, top_k=min(job.labels.top_k, 8)))
    labelled = collect(label(job, ds, on_cluster, p.vocab_limit, emit_nll=True, pool=(1, 1)),
                       None)
    order = np.argsort(labelled["sample_index"], kind="stable")
    rows = {k: v[order] for k, v in labelled.items()}
    if p.cache is not None:
        p.cache.write_eval(rows)
    return rows, False


def collect(ds: Any, empty: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for k, v in batch.items():
            parts.setdefault(k, []).append(v)
    if not parts:
        return dict(empty or {})
    return {k: np.concatenate(v) for k, v in parts.items()}


def placement_labels(labels: dict[str, str], on_cluster: bool) -> dict[str, str] | None:
    # One node cannot carry both the teacher's and the students' labels, so embedded Ray
    # ignores placement labels: the same job file then runs on a laptop and on a cluster.
    return dict(labels) if labels and on_cluster else None
