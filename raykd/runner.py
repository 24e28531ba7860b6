"""The one module that wires Ray: ray.init, the Ray Data pipeline, TorchTrainer.

    files --read_binary_files--> PackFiles (tasks) --> TeacherReplica pool (actors)
          --streaming_split--> TorchTrainer workers (DeepSpeed ZeRO) --> export

Run it on a laptop's CPU with `raykd run jobs/quickstart.yaml`.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from raykd import run_dir as rundir
from raykd.config import JobConfig, to_dict
from raykd.data.packing import PackFiles, empty_sequences, load_tokenizer
from raykd.errors import UserError
from raykd.preflight import Preflight, preflight
from raykd.storage import FileSet
from raykd.student.losses import target_mask
from raykd.teacher.loading import materialize
from raykd.teacher.replica import TeacherReplica


@dataclass
class Outcome:
    run_dir: Path
    summary: dict[str, Any]


def run(job: JobConfig, log: Callable[[str], None] = print) -> Outcome:
    """Distill end to end. Bad input raises UserError before the run directory exists."""
    started = time.time()
    checks = preflight(job)
    rundir.check_free(job)
    log(f"raykd: preparing teacher {job.teacher.model}")
    model_dir = materialize(job.teacher.model)
    on_cluster = _init_ray(job)
    # Both passes read every file, so malformed data fails here, before anything is written.
    log("raykd: packing data and labelling the held-out set")
    eval_rows = _eval_rows(job, checks.files, on_cluster)
    n_train = sequences(job, checks.files, "train").count()
    if n_train == 0:
        raise UserError(f"data.source: no training sequences in {len(checks.files.paths)} "
                        "file(s) (empty files, or all held out by data.eval_fraction)")
    path = rundir.create(job)
    log(f"raykd: run directory {path}")
    summary: dict[str, Any] = {"status": "failed", "run_dir": str(path)}
    try:
        summary = _distill(job, checks, model_dir, path, eval_rows, n_train, on_cluster, log)
    finally:
        summary["wall_s"] = round(time.time() - started, 1)
        rundir.write_json_atomic(path / "summary.json", summary)
    return Outcome(run_dir=path, summary=summary)


def _distill(job: JobConfig, checks: Preflight, model_dir: str, path: Path,
             eval_rows: dict[str, np.ndarray], n_train: int, on_cluster: bool,
             log: Callable[[str], None]) -> dict[str, Any]:
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from raykd.student.train_loop import train_loop_per_worker

    teacher_eval_loss = _mean_nll(eval_rows)
    total_steps = plan_steps(job, n_train)
    log(f"raykd: {len(eval_rows['sample_id'])} held-out sequences, teacher ppl "
        f"{math.exp(teacher_eval_loss):.2f}")
    log(f"raykd: {n_train} training sequences of {job.data.seq_len} tokens, {total_steps} steps "
        f"on {job.train.num_workers} worker(s), teacher pool {job.teacher.replicas.min}-"
        f"{job.teacher.replicas.max}")

    train_ds = sequences(job, checks.files, "train")
    storage = job.train.storage or str((path / "checkpoints").absolute())
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": to_dict(job),
                           "plan": {"total_steps": total_steps,
                                    "eval_ref": ray.put(eval_rows)}},
        torch_config=TorchConfig(backend="nccl" if job.train.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=job.train.num_workers, use_gpu=job.train.use_gpu,
            resources_per_worker={"CPU": job.train.cpus_per_worker, **job.train.resources,
                                  **({"GPU": 1} if job.train.use_gpu else {})},
            label_selector=_labels(job.train.node_labels, on_cluster),
        ),
        datasets={"train": label(job, train_ds, on_cluster)},
        dataset_config=ExactSplit(datasets_to_split=["train"]),
        run_config=ray.train.RunConfig(
            name=job.run.name,
            storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=job.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=[rundir.MetricsWriter(str((path / "metrics.jsonl").absolute()))],
        ),
    )
    with rundir.Follower(path / "metrics.jsonl", total_steps, log):
        result = trainer.fit()
    if result.error is not None:
        raise result.error
    final = result.metrics or {}
    export_dir = path / "student"
    with result.checkpoint.as_directory() as ckpt:
        shutil.copytree(Path(ckpt, "hf"), export_dir)
        trained = _ledger_counts(Path(ckpt, "ledger"))
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
        "samples_unique": trained["unique"],
        "samples_repeated": trained["repeated"],
        "student_eval_loss": final.get("eval_loss"),
        "student_eval_ppl": final.get("eval_ppl"),
        "student_eval_ppl_start": start_ppl,
        "teacher_eval_loss": teacher_eval_loss,
        "teacher_eval_ppl": math.exp(teacher_eval_loss),
        "eval_sequences": int(len(eval_rows["sample_id"])),
        "export_dir": str(export_dir),
        "checkpoint": result.checkpoint.path,
        "pipelined": bool(final.get("labeled_at_max", 0) > final.get("first_step_time", 0) > 0),
    }


# --------------------------------------------------------------------------- Ray Data


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


def label(job: JobConfig, ds: Any, on_cluster: bool, emit_nll: bool = False,
          pool: tuple[int, int] | None = None) -> Any:
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
                               "emit_nll": emit_nll},
        compute=ray.data.ActorPoolStrategy(min_size=lo, max_size=hi),
        batch_size=job.teacher.batch_size,
        batch_format="numpy",
        num_cpus=job.teacher.num_cpus,
        num_gpus=job.teacher.num_gpus,
        resources=job.teacher.resources or None,
        label_selector=_labels(job.teacher.node_labels, on_cluster),
    )


def _eval_rows(job: JobConfig, files: FileSet, on_cluster: bool) -> dict[str, np.ndarray]:
    """The held-out set (lowest sample ids, up to eval_max_samples), labelled with the
    teacher's soft labels and next-token NLL, as numpy columns."""
    import ray.data

    cols = _collect(sequences(job, files, "eval"), empty_sequences(job.data.seq_len))
    order = np.argsort(cols["sample_id"], kind="stable")[: job.data.eval_max_samples]
    cols = {k: v[order] for k, v in cols.items()}
    if len(order) == 0:
        raise UserError("data.eval_fraction: no held-out sequences; raise data.eval_fraction "
                        "or add data")
    ds = ray.data.from_items([{k: v[i] for k, v in cols.items()} for i in range(len(order))])
    labelled = _collect(label(job, ds, on_cluster, emit_nll=True, pool=(1, 1)), None)
    order = np.argsort(labelled["sample_id"], kind="stable")
    return {k: v[order] for k, v in labelled.items()}


def _collect(ds: Any, empty: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for k, v in batch.items():
            parts.setdefault(k, []).append(v)
    if not parts:
        return dict(empty or {})
    return {k: np.concatenate(v) for k, v in parts.items()}


def _mean_nll(rows: dict[str, np.ndarray]) -> float:
    import torch

    mask = target_mask(torch.from_numpy(rows["length"]), rows["input_ids"].shape[1]).numpy()
    return float((rows["teacher_nll"] * mask).sum() / max(mask.sum(), 1))


def plan_steps(job: JobConfig, n_train: int) -> int:
    """Optimiser steps of the run: the busiest rank's micro-batches / accumulation."""
    t = job.train
    per_rank = math.ceil(n_train / t.num_workers)
    micro = math.ceil(per_rank / t.micro_batch_size)
    steps = t.epochs * max(1, micro // t.grad_accum_steps)
    return min(steps, t.max_steps) if t.max_steps else steps


def _ledger_counts(ledger: Path) -> dict[str, int]:
    ids = [np.load(p, allow_pickle=False) for p in sorted(ledger.glob("*.npy"))]
    flat = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    unique = len(np.unique(flat))
    return {"unique": unique, "repeated": len(flat) - unique}


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


def _labels(labels: dict[str, str], on_cluster: bool) -> dict[str, str] | None:
    # One node cannot carry both the teacher's and the students' labels, so embedded Ray
    # ignores placement labels: the same job file then runs on a laptop and on a cluster.
    return dict(labels) if labels and on_cluster else None


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
    if not ray.is_initialized():
        address = job.run.ray_address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=job.run.verbose)
        else:
            on_cluster = False
            ray.init(num_cpus=ray_cpus(job), resources=ray_resources(job) or None,
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
