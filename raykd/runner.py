"""Runs a job on Ray: ray.init, the datasets of `raykd.pipeline`, TorchTrainer, outputs.

    pipeline.plan (driver) -> run directory -> TorchTrainer workers (DeepSpeed ZeRO)
    reading pipeline.first_epoch / later_epochs through streaming_split -> export

Run it on a laptop's CPU with `raykd run jobs/quickstart.yaml`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from raykd import pipeline, telemetry
from raykd import run_dir as rundir
from raykd.config import JobConfig, to_dict
from raykd.data.packing import load_tokenizer
from raykd.errors import UserError
from raykd.preflight import preflight
from raykd.progress import Follower
from raykd.storage import check_store, filesystem, is_remote
from raykd.student.ledger import FILE as LEDGER_FILE
from raykd.student.ledger import Ledger
from raykd.student.losses import target_mask
from raykd.student.optim import describe_zero
from raykd.teacher.loading import materialize
from raykd.teacher.replica import resolved


@dataclass
class Outcome:
    run_dir: Path
    summary: dict[str, Any]


def run(job: JobConfig, log: Callable[[str], None] = print, first_epoch: Any = None) -> Outcome:
    """Distill end to end. Bad input raises UserError before the run directory exists.

    `first_epoch`, a Ray Dataset of labelled rows, replaces the teacher pool and cache as
    the first epoch's source (benchmarks use it to time training on labels in memory).
    """
    started = time.time()
    checks = preflight(job)
    if job.run.resume:
        rundir.check_resumable(job)
    else:
        rundir.check_free(job)
    log(f"raykd: preparing teacher {job.teacher.model}")
    model_dir = materialize(job.teacher.model)
    on_cluster = _init_ray(job)
    # Packing reads every file, so malformed data fails here, before anything is written.
    log("raykd: packing data and labelling the held-out set")
    data = pipeline.plan(job, checks, model_dir, on_cluster, log)
    data.stats = telemetry.stats_name(job.run.name, started)
    pool = telemetry.start(data.stats)
    path = job.run_dir if job.run.resume else rundir.create(job)
    pointer = rundir.latest_checkpoint(path) if job.run.resume else None
    log(f"raykd: run directory {path}" + (
        f" (resuming from step {pointer['step']})" if pointer else ""))
    summary: dict[str, Any] = {"status": "failed", "run_dir": str(path)}
    try:
        summary = _distill(job, data, model_dir, path, on_cluster, log, first_epoch, pool)
    finally:
        telemetry.stop(pool)
        summary["wall_s"] = round(time.time() - started, 1)
        rundir.write_json_atomic(path / "summary.json", summary)
    return Outcome(run_dir=path, summary=summary)


def label_only(job: JobConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the teacher alone and fill the label cache (what `raykd label` does)."""
    started = time.time()
    if job.labels.cache is None:
        raise UserError("labels.cache: is null; `raykd label` needs a cache to fill")
    checks = preflight(job)
    log(f"raykd: preparing teacher {job.teacher.model}")
    model_dir = materialize(job.teacher.model)
    on_cluster = _init_ray(job)
    log("raykd: packing data and labelling the held-out set")
    data = pipeline.plan(job, checks, model_dir, on_cluster, log)
    assert data.cache is not None
    data.stats = telemetry.stats_name(job.run.name, started)
    pool = telemetry.start(data.stats)
    n_train = len(data.train)
    todo = n_train - len(data.cached)
    labelling = time.time()
    if todo:
        log(f"raykd: labelling {todo} sequences with {job.teacher.replicas.min}-"
            f"{job.teacher.replicas.max} teacher replica(s)")
        with Follower(None, 0, todo, job.run.progress, log, pool):
            for _ in pipeline.first_epoch(job, data, on_cluster).iter_batches(batch_size=None):
                pass
    label_s = time.time() - labelling
    labelled = telemetry.snapshot(pool) or {"tokens": todo * job.data.seq_len}
    telemetry.stop(pool)
    index = data.cache.index()
    covered = len(index.cached(data.layout.total) & data.train)
    if covered == n_train:
        data.cache.write_manifest(index, covered)
    size = sum(data.cache.fs.get_file_info(p).size for p in index.paths)
    tokens = index.rows() * job.data.seq_len
    return {"status": "succeeded" if covered == n_train else "incomplete",
            "cache": data.cache.uri, "train_sequences": n_train,
            "labelled_now": todo, "cached_before": len(data.cached),
            "shards": len(index.paths), "bytes": int(size),
            "bytes_per_token": round(size / max(tokens, 1), 1),
            "label_s": round(label_s, 3),
            "teacher_tokens_per_s": round(labelled["tokens"] / label_s, 1) if todo else None,
            "wall_s": round(time.time() - started, 1)}


@contextlib.contextmanager
def _sigint_given_back() -> Iterator[None]:
    """Ray Train's fit() installs a Ctrl-C handler that holds its controller actor, and
    leaves it installed: the controller, and the run's DatasetManager and split
    coordinators under it, then stay alive (idle, ~0.005-0.01 of a core each) until the next
    fit. Putting the caller's handler back lets them end with the run, for callers that
    run several jobs in one process (notebooks, sweeps, bench.speed)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield  # fit() installs no handler off the main thread either
        return
    before = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        if before is not None:  # None: set outside Python, so it cannot be put back
            signal.signal(signal.SIGINT, before)


def _distill(job: JobConfig, data: pipeline.DataPlan, model_dir: str, path: Path,
             on_cluster: bool, log: Callable[[str], None], first_epoch: Any = None,
             pool: Any = None) -> dict[str, Any]:
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from raykd.student.train_loop import train_loop_per_worker

    eval_rows, n_train = data.eval_rows, len(data.train)
    teacher_eval_loss = _mean_nll(eval_rows)
    total_steps = plan_steps(job, n_train)
    log(f"raykd: {len(eval_rows['sample_id'])} held-out sequences, teacher ppl "
        f"{math.exp(teacher_eval_loss):.2f}")
    log(f"raykd: {n_train} training sequences of {job.data.seq_len} tokens, {total_steps} steps "
        f"on {job.train.num_workers} worker(s) x {describe_zero(job.train)}, teacher pool "
        f"{job.teacher.replicas.min}-{job.teacher.replicas.max}")

    storage = job.train.storage or str((path / "checkpoints").absolute())
    storage_fs, storage_path = filesystem(storage, "train.storage")
    datasets = {"train": first_epoch if first_epoch is not None else
                FirstEpoch(job, data, on_cluster, str(path), storage)}
    if job.train.epochs > 1:
        datasets["later"] = pipeline.later_epochs(job, data, on_cluster)
    trainer = TorchTrainer(
        train_loop_per_worker,
        # teacher.dtype made concrete here: a co-located teacher then computes in the dtype
        # the held-out labels (labelled on the driver's resolution) were made in.
        train_loop_config={"job": to_dict(dataclasses.replace(job, teacher=resolved(job.teacher))),
                           "plan": {"total_steps": total_steps,
                                    "vocab_limit": data.vocab_limit,
                                    "samples_total": data.layout.total,
                                    "train_samples": n_train,
                                    "stats": data.stats,
                                    # No cache: every epoch is labelled by the pool anew.
                                    "later_epochs_streamed": (data.cache is None and
                                                              not job.teacher.colocated),
                                    "eval_ref": ray.put(eval_rows)}},
        torch_config=TorchConfig(backend="nccl" if job.train.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=job.train.num_workers, use_gpu=job.train.use_gpu,
            resources_per_worker={"CPU": job.train.cpus_per_worker, **job.train.resources,
                                  **({"GPU": 1} if job.train.use_gpu else {})},
            label_selector=pipeline.placement_labels(job.train.node_labels, on_cluster),
        ),
        datasets=datasets,
        dataset_config=ExactSplit(),
        run_config=ray.train.RunConfig(
            name=job.run.name,
            storage_path=storage_path,
            storage_filesystem=storage_fs if is_remote(storage) else None,
            failure_config=ray.train.FailureConfig(max_failures=job.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=[rundir.RunRecorder(str(path.absolute()), teacher_eval_loss)],
        ),
    )
    # What the teacher will label: the cache's misses once, or every epoch without a cache.
    to_label = (n_train - len(data.cached) if data.cache is not None
                else n_train * job.train.epochs)
    note = None
    if job.teacher.colocated:
        to_label, note = 0, "co-located: runs inside every student step"
    elif first_epoch is not None:
        to_label, note = 0, "labels given in memory"
    with Follower(path / "metrics.jsonl", total_steps, to_label, job.run.progress, log, pool,
                  note=note), _sigint_given_back():
        try:
            result = trainer.fit()
            error = result.error
        except Exception as e:  # noqa: BLE001 - explained below when a store is to blame
            error = e
    if error is not None:
        _blame_a_lost_store(job, storage, path)
        raise error
    final = result.metrics or {}
    export_dir = path / "student"
    with result.checkpoint.as_directory() as ckpt:
        shutil.copytree(Path(ckpt, "hf"), export_dir, dirs_exist_ok=True)
        ledger = Ledger.from_bytes(Path(ckpt, LEDGER_FILE).read_bytes())
    load_tokenizer(model_dir).save_pretrained(export_dir)
    first = rundir.read_metrics(path / "metrics.jsonl")
    start_ppl = next((r["eval_ppl"] for r in first if "eval_ppl" in r), None)
    return {
        "status": "succeeded",
        "run_dir": str(path),
        "steps": final.get("step", 0),
        "tokens": final.get("tokens", 0),
        "samples": final.get("samples", 0),
        "train_sequences": n_train,
        "samples_unique": len(ledger.samples[max(ledger.samples)]) if ledger.samples else 0,
        "samples_per_epoch": [len(ledger.samples[e]) for e in sorted(ledger.samples)],
        "rows_per_epoch": [ledger.rows[e] for e in sorted(ledger.samples)],
        "samples_repeated": sum(ledger.rows[e] - len(ledger.samples[e]) for e in ledger.samples),
        "student_eval_loss": final.get("eval_loss"),
        "student_eval_ppl": final.get("eval_ppl"),
        "student_eval_ppl_start": start_ppl,
        "teacher_eval_loss": teacher_eval_loss,
        "teacher_eval_ppl": math.exp(teacher_eval_loss),
        "eval_sequences": int(len(eval_rows["sample_id"])),
        "label_cache": data.cache.uri if data.cache else None,
        "cached_at_start": len(data.cached),
        "export_dir": str(export_dir),
        "checkpoint": result.checkpoint.path,
        "pipelined": bool(final.get("labeled_at_max", 0) > final.get("first_step_time", 0) > 0),
        "teacher_tokens": final.get("teacher_tokens"),
        "worker_peak_rss_mb": final.get("worker_peak_rss_mb"),
        # The idle teacher's CPUs (raykd.student.threads): rank 0's threads at the end, and
        # when it took them, from the start of its first epoch (absent if it never did).
        "student_threads": final.get("threads"),
        "threads_raised_after_s": final.get("threads_raised_after_s"),
        **{k: v for k, v in final.items() if k.startswith("epoch") and k.endswith("_s")},
    }


def _blame_a_lost_store(job: JobConfig, storage_uri: str, path: Path) -> None:
    """After a failed run: if a remote store it writes to is now gone, say so in one line
    (the raw error is a Ray traceback about a worker or the controller)."""
    for uri, key in ((storage_uri, "train.storage"), (job.labels.cache or "", "labels.cache")):
        if not uri or not is_remote(uri):
            continue
        try:
            check_store(uri, key)
        except UserError as lost:
            pointer = rundir.latest_checkpoint(path)
            where = f"step {pointer['step']}" if pointer else "none yet"
            raise UserError(f"{lost}; the run stopped (last complete checkpoint: {where}); "
                            f"once the store is back, `raykd resume {path}`") from None


def _mean_nll(rows: dict[str, np.ndarray]) -> float:
    import torch

    lengths = torch.as_tensor(np.array(rows["length"]))
    mask = target_mask(lengths, rows["input_ids"].shape[1]).numpy()
    return float((rows["teacher_nll"] * mask).sum() / max(mask.sum(), 1))


def plan_steps(job: JobConfig, n_train: int) -> int:
    """Optimiser steps of the run: the busiest rank's micro-batches / accumulation."""
    t = job.train
    per_rank = math.ceil(n_train / t.num_workers)
    micro = math.ceil(per_rank / t.micro_batch_size)
    steps = t.epochs * max(1, micro // t.grad_accum_steps)
    return min(steps, t.max_steps) if t.max_steps else steps


class FirstEpoch:
    """The first epoch of every worker-group (re)start, built by Ray Train in its controller
    (on the driver's node) each time the group starts: it skips what the latest committed
    checkpoint's ledger says was trained, before the teacher sees it."""

    def __init__(self, job: JobConfig, data: pipeline.DataPlan, on_cluster: bool,
                 run_dir: str, storage_uri: str):
        self.job, self.data, self.on_cluster = job, data, on_cluster
        self.run_dir, self.storage_uri = run_dir, storage_uri

    def __call__(self) -> Any:
        pointer = rundir.latest_checkpoint(Path(self.run_dir))
        done, epoch = self.done(pointer) if pointer else (None, 0)
        rundir.append_event(Path(self.run_dir), {
            "event": "workers_start", "resume_step": pointer["step"] if pointer else 0,
            "skipped": len(done) if done is not None else 0})
        rows = pipeline.first_epoch_rows(self.job, self.data, done)
        # Announced before the pool starts, so the workers learn when it is done and take
        # its CPUs (raykd.student.threads).
        pass_id = telemetry.expect(self.data.stats, len(rows.to_label))
        return pipeline.first_epoch(self.job, self.data, self.on_cluster, done, epoch, rows,
                                    pass_id)

    def done(self, pointer: dict[str, Any]) -> tuple[Any, int]:
        """What the checkpoint's epoch already trained on, and that epoch's index."""
        from raykd import storage

        fs, _ = storage.filesystem(self.storage_uri, "train.storage")
        with fs.open_input_file(f"{pointer['path']}/{LEDGER_FILE}") as f:
            ledger = Ledger.from_bytes(f.read())
        with fs.open_input_file(f"{pointer['path']}/progress.json") as f:
            epoch = json.loads(f.read())["epoch"]
        return ledger.epoch(epoch), epoch


try:
    from ray.train import DataConfig as _DataConfig
except ImportError:  # pragma: no cover
    _DataConfig = object  # type: ignore[misc,assignment]


class ExactSplit(_DataConfig):  # type: ignore[misc,valid-type]
    """Ray Train's DataConfig, but split with equal=False: equal=True drops rows to even
    the ranks out, and a distiller must train on every sample. The train loop keeps ranks
    in step when their counts differ."""

    def configure(self, datasets: dict[str, Any], world_size: int, worker_handles: Any,
                  worker_node_ids: Any, **kwargs: Any) -> list[dict[str, Any]]:
        output: list[dict[str, Any]] = [{} for _ in range(world_size)]
        hints = worker_node_ids if self._enable_shard_locality else None
        for name, ds in datasets.items():
            ds = ds.copy(ds)
            ds.context.execution_options = self._resolve_execution_options(name)
            for i, split in enumerate(ds.streaming_split(world_size, equal=False,
                                                         locality_hints=hints)):
                output[i][name] = split
        return output


# --------------------------------------------------------------------------- Ray


def ray_cpus(job: JobConfig) -> int:
    """Logical CPUs for embedded Ray: what the job reserves plus one for Ray Data tasks.

    Ray Data hangs silently when Train takes every CPU, so the budget always leaves room
    for reading and tokenising next to the teacher pool.
    """
    if job.run.num_cpus:
        return job.run.num_cpus
    need = (job.teacher.replicas.max * job.teacher.num_cpus
            + job.train.num_workers * job.train.cpus_per_worker + 1)
    return max(os.cpu_count() or 1, math.ceil(need))


def ray_resources(job: JobConfig) -> dict[str, float]:
    """Custom resources embedded Ray declares so that cluster placement keys still fit."""
    need: dict[str, float] = {}
    for name, amount in job.teacher.resources.items():
        need[name] = need.get(name, 0.0) + amount * job.teacher.replicas.max
    for name, amount in job.train.resources.items():
        need[name] = need.get(name, 0.0) + amount * job.train.num_workers
    return need


def _init_ray(job: JobConfig) -> bool:
    """Start or join Ray; True when joining a cluster (placement labels then apply)."""
    import ray
    import ray.data

    on_cluster = True
    if not job.run.verbose:
        # Ray announces its (sound) default of token auth for local clusters on stderr;
        # for an embedded run that is noise between raykd's own lines.
        logging.getLogger("ray._private.authentication.authentication_token_setup"
                          ).setLevel(logging.ERROR)
    if not ray.is_initialized():
        address = job.run.ray_address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=job.run.verbose)
        else:
            on_cluster = False
            # address="local": a new one-node Ray, never a `ray start` cluster that
            # happens to run on this machine.
            ray.init(address="local", num_cpus=ray_cpus(job),
                     resources=ray_resources(job) or None,
                     include_dashboard=False, log_to_driver=job.run.verbose,
                     configure_logging=job.run.verbose)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = job.run.verbose
    ctx.print_on_execution_start = job.run.verbose
    if not job.run.verbose:
        # Ray Data logs every dataset's start/finish and re-logs UDF errors that raykd
        # reports itself (as one line for bad input); keep the console to raykd's lines.
        logging.getLogger("ray.data").setLevel(logging.CRITICAL)
    return on_cluster
