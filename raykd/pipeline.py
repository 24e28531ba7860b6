"""The Ray Data side of a job: packed sequences, the teacher pool, the label cache.

    files --read_binary_files--> PackFiles --> [KeepIds] --> TeacherReplica pool
          --> ShardWriter (write-through) ----------------------------+
    CacheSource (labels already cached) -------------------------------+--> students

`plan()` runs the cheap passes on the driver before any run directory exists (so bad data
fails fast): it packs every file once to learn the training sample ids, labels (or reads
from the cache) the held-out set, and opens the cache. `first_epoch()` then reads what the
cache holds and sends only the rest through the teacher; `later_epochs()` reads the cache
alone, so a second epoch, or a second run with the same lineage, starts no teacher.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from raykd.config import JobConfig
from raykd.data.cache_source import CacheSource, KeepIds, ShardWriter
from raykd.data.label_cache import (LabelCache, Lineage, dataset_fingerprint,
                                    model_fingerprint, tokenizer_fingerprint)
from raykd.data.packing import PackFiles, empty_sequences
from raykd.errors import UserError
from raykd.preflight import Preflight
from raykd.storage import FileSet, local_path
from raykd.teacher.replica import TeacherReplica, resolve_dtype


@dataclass
class DataPlan:
    files: FileSet
    train_ids: np.ndarray  # sorted sample ids of the training split
    eval_rows: dict[str, np.ndarray]  # labelled held-out sequences, by sample id
    cache: LabelCache | None
    cached: np.ndarray  # training sample ids the cache already held
    eval_from_cache: bool
    vocab_limit: int | None  # logits compared over this many tokens (student.vocab)


def plan(job: JobConfig, checks: Preflight, model_dir: str, on_cluster: bool,
         log: Callable[[str], None]) -> DataPlan:
    files = checks.files
    train_ids = np.sort(_column(sequences(job, files, "train").select_columns(["sample_id"]),
                                "sample_id"))
    if len(train_ids) == 0:
        raise UserError(f"data.source: no training sequences in {len(files.paths)} file(s) "
                        "(empty files, or all held out by data.eval_fraction)")
    cache = None
    if job.labels.cache is not None:
        lin = lineage(job, files, model_dir, checks.vocab_limit)
        cache = LabelCache(cache_uri(job, lin), lin).open()
    eval_rows, from_cache = _eval_rows(job, files, cache, on_cluster, checks.vocab_limit)
    cached = np.zeros(0, np.int64)
    if cache is not None:
        cached = train_ids[np.isin(train_ids, cache.index().cached_ids())]
        log(f"raykd: label cache {cache.uri}: {len(cached)} of {len(train_ids)} training "
            "sequences already labelled")
    return DataPlan(files, train_ids, eval_rows, cache, cached, from_cache, checks.vocab_limit)


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
    )


def cache_uri(job: JobConfig, lin: Lineage) -> str:
    """labels.cache: auto -> <output_dir>/label-cache/<lineage key>."""
    if job.labels.cache == "auto":
        return os.path.abspath(os.path.join(job.run.output_dir, "label-cache", lin.key()))
    return job.labels.cache


# --------------------------------------------------------------------------- datasets


def sequences(job: JobConfig, files: FileSet, split: str) -> Any:
    """Packed sequences of one split: sample_id, input_ids (seq_len,), length."""
    import ray.data

    ds = ray.data.read_binary_files(files.paths, include_paths=True, filesystem=files.fs,
                                    override_num_blocks=len(files.paths))
    pack = PackFiles(
        teacher_model=job.teacher.model, names=dict(zip(files.paths, files.names)),
        fmt=job.data.format, text_key=job.data.text_key, seq_len=job.data.seq_len,
        eval_fraction=job.data.eval_fraction, split=split,
    )
    # One file per call: a sequence's id depends on its file alone (see data.packing).
    return ds.map_batches(pack, batch_size=1, batch_format="numpy")


def label(job: JobConfig, ds: Any, on_cluster: bool, vocab_limit: int | None,
          emit_nll: bool = False, pool: tuple[int, int] | None = None) -> Any:
    """Add soft-label columns with an autoscaling pool of teacher replicas."""
    import ray.data

    lo, hi = pool or (job.teacher.replicas.min, job.teacher.replicas.max)
    # A file packs into one block of many sequences, and a map task emits its output only
    # once the input block is done. Re-blocking to one teacher batch per block (streaming,
    # no shuffle) lets labels flow to the students batch by batch.
    ds = ds.repartition(target_num_rows_per_block=job.teacher.batch_size)
    return ds.map_batches(
        TeacherReplica,
        fn_constructor_kwargs={"teacher": job.teacher, "labels": job.labels,
                               "emit_nll": emit_nll, "vocab_limit": vocab_limit},
        compute=ray.data.ActorPoolStrategy(min_size=lo, max_size=hi),
        batch_size=job.teacher.batch_size,
        batch_format="numpy",
        num_cpus=job.teacher.num_cpus,
        num_gpus=job.teacher.num_gpus,
        resources=job.teacher.resources or None,
        label_selector=placement_labels(job.teacher.node_labels, on_cluster),
    )


def first_epoch(job: JobConfig, p: DataPlan, on_cluster: bool) -> Any:
    """Training rows of the first epoch: cached ones from the cache, the rest labelled
    now (and written through to the cache)."""
    import ray
    import ray.data

    if p.cache is None:
        return label(job, sequences(job, p.files, "train"), on_cluster, p.vocab_limit)
    cached = p.cached
    missing = np.setdiff1d(p.train_ids, cached, assume_unique=True)
    parts = []
    if len(cached):
        parts.append(ray.data.read_datasource(CacheSource(p.cache.uri, p.cache.lineage, cached)))
    if len(missing):
        todo = sequences(job, p.files, "train")
        if len(cached):
            todo = todo.map_batches(KeepIds(ray.put(missing)), batch_format="numpy")
        parts.append(write_through(job, p.cache, label(job, todo, on_cluster, p.vocab_limit)))
    return parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])


def later_epochs(job: JobConfig, p: DataPlan, on_cluster: bool) -> Any:
    """Training rows of every later epoch: the cache alone (filled by the first), or the
    teacher again when caching is off."""
    import ray.data

    if p.cache is None:
        return label(job, sequences(job, p.files, "train"), on_cluster, p.vocab_limit)
    return ray.data.read_datasource(CacheSource(p.cache.uri, p.cache.lineage, p.train_ids))


def write_through(job: JobConfig, cache: LabelCache, labelled: Any) -> Any:
    # One shard per teacher batch (each block is one); light tasks beside the pool.
    return labelled.map_batches(ShardWriter(cache.uri, cache.lineage), batch_size=None,
                                batch_format="numpy", num_cpus=0.25)


# --------------------------------------------------------------------------- held-out set


def _eval_rows(job: JobConfig, files: FileSet, cache: LabelCache | None, on_cluster: bool,
               vocab_limit: int | None) -> tuple[dict[str, np.ndarray], bool]:
    """The held-out set (lowest sample ids, up to eval_max_samples) with the teacher's soft
    labels and next-token NLL, as numpy columns sorted by sample id."""
    import ray.data

    cols = collect(sequences(job, files, "eval"), empty_sequences(job.data.seq_len))
    order = np.argsort(cols["sample_id"], kind="stable")[: job.data.eval_max_samples]
    if len(order) == 0:
        raise UserError("data.eval_fraction: no held-out sequences; raise data.eval_fraction "
                        "or add data")
    cols = {k: v[order] for k, v in cols.items()}
    if cache is not None:
        hit = cache.read_eval(cols["sample_id"])
        if hit is not None:
            return hit, True
    ds = ray.data.from_items([{k: v[i] for k, v in cols.items()} for i in range(len(order))])
    labelled = collect(label(job, ds, on_cluster, vocab_limit, emit_nll=True, pool=(1, 1)), None)
    order = np.argsort(labelled["sample_id"], kind="stable")
    rows = {k: v[order] for k, v in labelled.items()}
    if cache is not None:
        cache.write_eval(rows)
    return rows, False


def collect(ds: Any, empty: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for k, v in batch.items():
            parts.setdefault(k, []).append(v)
    if not parts:
        return dict(empty or {})
    return {k: np.concatenate(v) for k, v in parts.items()}


def _column(ds: Any, name: str) -> np.ndarray:
    out = collect(ds, {name: np.zeros(0, np.int64)})
    return out[name]


def placement_labels(labels: dict[str, str], on_cluster: bool) -> dict[str, str] | None:
    # One node cannot carry both the teacher's and the students' labels, so embedded Ray
    # ignores placement labels: the same job file then runs on a laptop and on a cluster.
    return dict(labels) if labels and on_cluster else None
