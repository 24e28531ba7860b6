"""The student's training loop: what every Ray Train worker runs, top to bottom.

    build student -> deepspeed.initialize -> [restore] -> eval ->
    for each epoch: for each micro-batch of soft labels streamed from the teacher pool:
        forward + loss (StudentLoss), engine.backward, engine.step
        every log_every / eval_every / checkpoint_every steps: report (+ eval, checkpoint)
    -> final eval -> final checkpoint holding the exported Hugging Face student

Ranks may receive different numbers of rows (the split is exact, not equalised, so no
sample is dropped). Every micro-step therefore starts with an all-reduce of "do I still
have data"; a rank that ran out feeds a zero-length batch, so DeepSpeed's collectives stay
in step and the loop ends on all ranks together.
"""

from __future__ import annotations

import os
import resource
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from raykd import telemetry
from raykd.data import soft_labels
from raykd.student import checkpoint as ckpt
from raykd.student.checkpoint import Progress
from raykd.student.head_loss import StudentLoss
from raykd.student.ledger import Ledger, candidates, fresh_rows
from raykd.student.threads import for_worker


@dataclass
class Window:
    """Loss sums since the last report (this rank)."""

    loss: float = 0.0
    kd: float = 0.0
    ce: float = 0.0
    tokens: float = 0.0
    samples: int = 0
    cached: int = 0  # of `samples`, rows read from the label cache
    wait_s: float = 0.0  # spent waiting for the next batch (the labels' side is slower)
    started: float = field(default_factory=time.time)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import deepspeed
    import ray
    import ray.train

    from raykd.config import job_from_dict
    from raykd.student.model import student_for
    from raykd.student.optim import deepspeed_config, lr_lambda, optimizer
    from raykd.teacher.loading import load_model, materialize

    job = job_from_dict(config["job"])
    plan = config["plan"]
    train = job.train
    # Ask for the first batch now, in the background: on a fresh run it waits for the
    # teacher pool to start (processes, model load, a first batch), which then overlaps
    # this worker's own start (model build, DeepSpeed, the first evaluation).
    first_batches = (_EarlyStart(_iterate(ray.train.get_dataset_shard("train"),
                                          train.micro_batch_size,
                                          streamed=not job.teacher.colocated))
                     if ray.train.get_checkpoint() is None else None)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = torch.device("cuda", ctx.get_local_rank()) if train.use_gpu else torch.device("cpu")
    if train.use_gpu:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, int(train.cpus_per_worker)))
    # Its own CPUs, then the idle teacher's too (raykd.student.threads).
    threads = for_worker(plan, train, job.teacher.colocated, ctx.get_local_world_size())
    torch.manual_seed(job.run.seed)  # same seed on every rank: identical initial students

    if job.student.model is not None:
        model = load_model(materialize(job.student.model, "student.model"), "float32", "cpu")
        model.train()
    else:
        model = student_for(materialize(job.teacher.model), job.student)
    model_config = model.config
    vocab_limit = plan.get("vocab_limit")
    vocab_size = vocab_limit or model_config.vocab_size
    opt = optimizer(model, train)
    total_steps = plan["total_steps"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(train, total_steps))
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=opt, lr_scheduler=sched,
        config=deepspeed_config(train, world), dist_init_required=False,
    )

    colocated = None
    if job.teacher.colocated:
        from raykd.student.colocated import ColocatedTeacher

        colocated = ColocatedTeacher(job, vocab_limit, device)

    progress = Progress(Ledger(plan["samples_total"]))
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            progress = ckpt.restore(engine, d)

    eval_rows = _rank_rows(ray.get(plan["eval_ref"]), rank, world)
    # The first epoch of this (re)start streams from the teacher pool (and cache); later
    # epochs read the label cache the first one filled (see raykd.pipeline).
    first_epoch = progress.epoch
    shards = {"train": ray.train.get_dataset_shard("train")}
    if train.epochs > first_epoch + 1:
        shards["later"] = ray.train.get_dataset_shard("later")
    labeled_at_max = 0.0
    first_step_time = None
    pool = telemetry.find(plan.get("stats")) if rank == 0 else None
    teacher_rate = telemetry.Rate()

    def report(metrics: dict[str, Any], save: bool = False, final: bool = False) -> None:
        base = {"step": progress.step, "epoch": progress.epoch, "samples": progress.samples,
                "tokens": progress.tokens, "time": time.time(),
                "labeled_at_max": _all_max(labeled_at_max, device),
                **({"threads": threads.now} if threads is not None else {}),
                **teacher_rate.update(telemetry.snapshot(pool)), **metrics}
        if not save:
            ray.train.report(base)
            return
        with tempfile.TemporaryDirectory() as tmp:
            _flush_rows(progress, device)
            ckpt.save(engine, progress, tmp, rank, job.run.name)
            if final:
                from raykd.student.model import export, full_state_dict

                state = full_state_dict(engine)
                if state is not None:
                    export(model_config, state, os.path.join(tmp, "hf"))
            ray.train.report(base, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    # The head and loss a chunk of positions at a time when the model allows it: the full
    # (positions x vocabulary) logits are what made the student's step slow on CPU.
    student_loss = StudentLoss(engine, vocab_size, alpha=job.loss.alpha,
                               temperature=job.labels.temperature, kind=job.loss.kind)

    def evaluate_now() -> dict[str, float]:
        return evaluate(engine, student_loss, eval_rows, job, device, vocab_size, colocated)

    if progress.step == 0 and checkpoint is None:
        report(evaluate_now())

    window = Window()
    done = max_steps_reached = False
    epoch_seconds: dict[int, float] = {}
    loop_started = time.time()
    teacher_may_run = False  # the epoch is labelled by a pool of its own (no label cache)
    for epoch in range(progress.epoch, train.epochs):
        progress.epoch = epoch
        epoch_started = time.time()
        shard = shards["train" if epoch == first_epoch else "later"]
        teacher_may_run = epoch != first_epoch and plan["later_epochs_streamed"]
        if epoch == first_epoch and first_batches is not None:
            epoch_batches = first_batches
        else:
            streamed = (not job.teacher.colocated if epoch == first_epoch
                        else plan["later_epochs_streamed"])
            epoch_batches = _iterate(shard, train.micro_batch_size, streamed=streamed)
        batches = _timed(epoch_batches,
                         lambda: window)  # noqa: B023 - the window of the moment, on purpose
        for batch in _synced(batches, lambda: _empty_batch(job, vocab_size), device):
            engine.train()
            if threads is not None:
                threads.update(teacher_may_run)
            keep = _exactly_once(batch, progress, epoch, rank, world, train.micro_batch_size,
                                 device)
            batch = {k: v.to(device) for k, v in batch.items()}
            batch["length"] = batch["length"] * keep.to(device)  # length 0: trains nothing
            labels = _labels(batch, job, device, colocated)
            parts = student_loss(batch["input_ids"], batch["length"], labels)
            boundary = engine.is_gradient_accumulation_boundary()
            engine.backward(parts.loss)
            engine.step()
            if threads is not None:
                # Asked now, answered while the next batch comes: the next step then runs
                # on threads that know the pool's state as of this step's end.
                threads.update(teacher_may_run)

            n = int(keep.sum())
            progress.rows += n
            if "from_cache" in batch:
                window.cached += int(batch["from_cache"][keep.to(device)].sum())
            if n and "labeled_at" in batch:
                newest = float(batch["labeled_at"][keep.to(device)].max())
                labeled_at_max = max(labeled_at_max, newest)
            tok = float(parts.tokens)
            window.loss += float(parts.loss.detach()) * tok
            window.kd += float(parts.kd) * tok
            window.ce += float(parts.ce) * tok
            window.tokens += tok
            window.samples += n
            if not boundary:
                continue

            progress.step += 1
            if first_step_time is None:
                first_step_time = time.time()
            max_steps_reached = train.max_steps is not None and progress.step >= train.max_steps
            log = progress.step % train.log_every == 0 or max_steps_reached
            do_eval = bool(train.eval_every) and progress.step % train.eval_every == 0
            save = (bool(train.checkpoint_every) and progress.step % train.checkpoint_every == 0
                    and not max_steps_reached)  # the final save follows
            if log or do_eval or save:
                metrics = _window_metrics(window, float(engine.get_lr()[0]), device, progress)
                window = Window()
                if do_eval:
                    metrics.update(evaluate_now())
                report(metrics, save=save)
            if max_steps_reached:
                done = True
                break
        epoch_seconds[epoch] = time.time() - epoch_started
        _flush_rows(progress, device)
        if done:
            break
        _check_epoch(progress, epoch, plan["train_samples"])
    metrics = _last_window_metrics(window, float(engine.get_lr()[0]), device, progress)
    if threads is not None:  # the last evaluation is the students' alone too
        threads.update(teacher_may_run, force=True)
    metrics.update(evaluate_now())
    metrics["first_step_time"] = first_step_time or 0.0
    if threads is not None and threads.raised_at is not None:
        # When this worker took the idle teacher's CPUs, and how long into its first epoch.
        metrics["threads_raised_at"] = threads.raised_at
        metrics["threads_raised_after_s"] = round(threads.raised_at - loop_started, 3)
    # ru_maxrss is in KiB on Linux: memory must not grow with the dataset (bench/speed.py).
    metrics["worker_peak_rss_mb"] = _all_max(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, device)
    metrics.update({f"epoch{e}_s": round(s, 3) for e, s in epoch_seconds.items()})
    report(metrics, save=True, final=True)


# --------------------------------------------------------------------------- evaluation


def evaluate(engine: Any, student_loss: StudentLoss, rows: dict[str, np.ndarray], job: Any,
             device: torch.device, vocab_size: int, colocated: Any = None) -> dict[str, float]:
    """Held-out next-token loss (T = 1) and KD loss of the student, summed over ranks
    (against the co-located teacher's labels when there is one)."""
    engine.eval()
    sums = torch.zeros(3, dtype=torch.float64)  # ce*tokens, kd*tokens, tokens
    mb = job.train.micro_batch_size
    n = len(rows["sample_id"])
    chunks = (
        {k: torch.from_numpy(v[i:i + mb]) for k, v in rows.items()} for i in range(0, n, mb)
    )
    with torch.no_grad():
        for batch in _synced(chunks, lambda: _empty_batch(job, vocab_size), device):
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = _labels(batch, job, device, colocated)
            parts = student_loss(batch["input_ids"], batch["length"], labels, with_kd=True)
            sums += torch.stack([parts.ce * parts.tokens, parts.kd * parts.tokens,
                                 parts.tokens]).double().cpu()
    sums = _all_sum(sums, device)
    tokens = max(float(sums[2]), 1.0)
    loss = float(sums[0]) / tokens
    return {"eval_loss": loss, "eval_ppl": float(np.exp(min(loss, 50.0))),
            "eval_kd": float(sums[1]) / tokens, "eval_tokens": float(sums[2])}


# --------------------------------------------------------------------------- helpers


def _synced(batches: Any, empty: Any, device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    """Yield batches until every rank is out of data; exhausted ranks get `empty()`."""
    it = iter(batches)
    while True:
        batch = next(it, None)
        more = torch.tensor([0 if batch is None else 1], dtype=torch.int64, device=device)
        if dist.is_initialized():
            dist.all_reduce(more, op=dist.ReduceOp.MAX)
        if int(more.item()) == 0:
            return
        yield batch if batch is not None else empty()


def _labels(batch: dict[str, torch.Tensor], job: Any, device: torch.device, colocated: Any
            ) -> soft_labels.SoftLabels:
    """The batch's soft labels: decoded from its columns, or from the co-located teacher."""
    if colocated is not None:
        return colocated(batch["input_ids"], batch["sample_id"])
    return soft_labels.decode(batch, job.labels.temperature, device)


def _empty_batch(job: Any, vocab_size: int) -> dict[str, torch.Tensor]:
    """One row of length 0: contributes nothing, but runs the model like a real batch."""
    # (A co-located teacher labels batches itself: its empty batch needs no wide columns.)
    seq = job.data.seq_len
    k = min(job.labels.top_k, vocab_size, 8 if job.teacher.colocated else vocab_size)
    m = 0 if job.teacher.colocated else soft_labels.tail_samples_for(job.labels, vocab_size)
    labels = soft_labels.empty_label_columns(job.labels.encoding, 1, seq, k, vocab_size, m)
    return {
        "sample_id": torch.zeros(1, dtype=torch.int64),
        "sample_index": torch.zeros(1, dtype=torch.int64),
        "input_ids": torch.zeros(1, seq, dtype=torch.int32),
        "length": torch.zeros(1, dtype=torch.int32),
        "labeled_at": torch.zeros(1, dtype=torch.float64),
        "from_cache": torch.zeros(1, dtype=torch.int8),
        **{name: torch.from_numpy(v) for name, v in labels.items()},
    }


def _iterate(shard: Any, micro_batch_size: int, *, streamed: bool) -> Any:
    """Torch batches of `shard`. A `streamed` shard is one the teacher pool labels as it
    goes (the first epoch; every epoch when there is no label cache), one label block per
    teacher batch; Ray Data's default prefetch of one batch holds a block back until the
    next one exists, so each block reached the student one teacher batch late (measured:
    the first one 7-9 s after it was written). Epochs read from the label cache, and a
    co-located teacher's plain sequences, keep the prefetch: it overlaps reads with steps
    (a rerun whose first epoch is all cached reads it without, each block's fetch then
    inside the step's wait rather than beside it)."""
    return shard.iter_torch_batches(batch_size=micro_batch_size, drop_last=False,
                                    prefetch_batches=0 if streamed else 1)


class _EarlyStart:
    """Iterates `batches`, having fetched the first one in a background thread since it
    was made (errors are raised here, in the loop, as they would have been)."""

    _END = object()

    def __init__(self, batches: Any):
        self._it = iter(batches)
        self._first: Any = self._END
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._fetch, name="raykd-first-batch",
                                        daemon=True)
        self._thread.start()

    def _fetch(self) -> None:
        try:
            self._first = next(self._it, self._END)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consuming thread
            self._error = e

    def __iter__(self) -> Iterator[Any]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        if self._first is not self._END:
            yield self._first
            yield from self._it


def _timed(batches: Any, window: Any) -> Iterator[Any]:
    """`batches`, adding the time spent waiting for each one to the current window."""
    it = iter(batches)
    while True:
        started = time.perf_counter()
        batch = next(it, None)
        window().wait_s += time.perf_counter() - started
        if batch is None:
            return
        yield batch


def _rank_rows(rows: dict[str, np.ndarray], rank: int, world: int) -> dict[str, np.ndarray]:
    return {k: v[rank::world] for k, v in rows.items()}


def _all_sum(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if not dist.is_initialized():
        return t
    moved = t.to(device)
    dist.all_reduce(moved, op=dist.ReduceOp.SUM)
    return moved.cpu()


def _all_max(value: float, device: torch.device) -> float:
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _last_window_metrics(window: Window, lr: float, device: torch.device,
                         progress: Progress) -> dict[str, float]:
    """The rows trained since the last report, once the loop is over ({} when none were).
    Whether there were any is decided by all ranks together: they run the same
    micro-batches, but one may end the epoch on real rows while another has only
    `_synced`'s empty ones, and a rank-local test left them in different collectives."""
    trained = _all_max(float(window.samples), device) > 0
    return _window_metrics(window, lr, device, progress) if trained else {}


def _window_metrics(window: Window, lr: float, device: torch.device, progress: Progress
                    ) -> dict[str, float]:
    sums = _all_sum(torch.tensor([window.loss, window.kd, window.ce, window.tokens,
                                  float(window.samples), float(window.cached)],
                                 dtype=torch.float64), device)
    elapsed = max(time.time() - window.started, 1e-9)
    # The slowest-fed rank sets the pace: a large share spent waiting means the teacher
    # pool (or the cache reader) cannot keep up, a small one that the students are the limit.
    wait = _all_max(window.wait_s, device) / elapsed
    tokens = max(float(sums[3]), 1.0)
    progress.tokens += int(sums[3])
    progress.samples += int(sums[4])
    return {
        "loss": float(sums[0]) / tokens,
        "kd_loss": float(sums[1]) / tokens,
        "ce_loss": float(sums[2]) / tokens,
        "lr": lr,
        "tokens_per_s": float(sums[3]) / elapsed,
        "data_wait_frac": min(wait, 1.0),
        "cache_hit_rate": float(sums[5]) / max(float(sums[4]), 1.0),
        "samples": progress.samples,
        "tokens": progress.tokens,
    }


def _exactly_once(batch: dict[str, torch.Tensor], progress: Progress, epoch: int, rank: int,
                  world: int, width: int, device: torch.device) -> torch.Tensor:
    """Which rows of this micro-batch to train (bool, on CPU): every rank shares its
    candidates, so a sample arriving twice (a retried batch, a duplicated cache shard, a
    restart that replays it) is trained once, by the lowest rank holding it."""
    index = batch["sample_index"].numpy()
    valid = batch["length"].numpy() > 0
    mine = candidates(progress.ledger, epoch, index, valid, width)
    if dist.is_initialized() and world > 1:
        out = [torch.zeros(width, dtype=torch.int64, device=device) for _ in range(world)]
        dist.all_gather(out, torch.from_numpy(mine).to(device))
        gathered = torch.stack(out).cpu().numpy()
    else:
        gathered = mine[None]
    keep = fresh_rows(progress.ledger, epoch, index, valid, gathered, rank)
    taken = gathered[gathered >= 0]
    progress.ledger.epoch(epoch).add(taken)
    return torch.from_numpy(keep)


def _check_epoch(progress: Progress, epoch: int, expected: int) -> None:
    """Every training sample once: as many distinct samples as the split holds, and as
    many rows trained as distinct samples."""
    done, rows = len(progress.ledger.epoch(epoch)), progress.ledger.rows[epoch]
    if done != expected:
        raise RuntimeError(f"epoch {epoch} trained {done} of {expected} training samples; "
                           f"{expected - done} never arrived (an incomplete label cache?)")
    if rows != done:
        raise RuntimeError(f"epoch {epoch} trained {rows} rows for {done} samples")


def _flush_rows(progress: Progress, device: torch.device) -> None:
    """Add every rank's rows since the last flush to the ledger (a collective)."""
    rows = int(_all_sum(torch.tensor([float(progress.rows)], dtype=torch.float64), device)[0])
    progress.ledger.epoch(progress.epoch)
    progress.ledger.rows[progress.epoch] += rows
    progress.rows = 0
