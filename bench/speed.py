"""Pipeline speed, side by side in one run on the same CPUs.

    python -m bench.speed [--plays 1] [--seq-len 128]

One workload: SmolLM2-135M-Instruct teaching the quickstart's 4-layer student on one
Shakespeare play (~200 sequences of 128 tokens), top-64 compact labels, the teacher in
`--teacher-dtype` (auto, the default: bf16 on a CPU with bf16 instructions). Every variant
gets the same 2 CPUs. Epoch times are measured inside the train loop (from the start of
the epoch's loop to its last step; a streamed run asks for its first batch when the
worker starts, so the teacher pool starts while the student builds its model),
teacher-only time around the labelling pass.

  (a) teacher-only      label every sequence into an empty cache, train nothing
  (b) student-only      one epoch on labels already in memory (no teacher)
  (c) streamed          raykd: teacher pool (1 CPU) streaming to the student (1 CPU);
                        once the pool has labelled the epoch, the student also runs on
                        the teacher's CPU (train.reuse_teacher_cpus, the default)
  (d) label-then-train  (a) to storage, then one epoch reading it back (DistillKit's way)
  (e) co-located        teacher forward inside each training step, one worker with both
                        CPUs (TRL's / torchdistill's way)
  (f) epoch 2           the second epoch of (d)'s run, reading the label cache on one
                        thread as (b) does (a second epoch of (c) would have the
                        teacher's CPU as well, and would not compare the two reads)

They run in the order a, b, c, d, e, c, b, a (the repeats from empty caches), and a, b
and c are the means of their two runs: the machine's speed drifts within a run, and a
drift that is linear over it then cancels out of every ratio (c / max(a, b) of each half
is printed too). (d) is the mean (a) plus one epoch reading (a)'s cache.

Then `bench.sharing`: the teacher's and the student's work as two plain processes, alone
and at the same time, and the c / max(a, b) that their sharing the cores alone would give;
c over that floor is what the pipeline itself adds. The floor's student keeps one thread
after the teacher is done, so (c), whose student then takes the teacher's CPU, can go below
it.

`--shuffle-cost` instead runs (c) alone with data.shuffle on and off (on, off, off, on,
each into a fresh cache) and prints their ratio: what the global shuffle of the token
ids before the teacher costs a streamed epoch.

`--cache-vs-memory` instead asks what (f) / b asks with the worker held fixed: after (a)
fills a cache, run X trains one worker for two epochs, the first on the labels in memory
(as b), the second reading the cache (as f), and run Y trains two epochs both from the
cache, which says how much a worker's second epoch differs from its first by itself.

Also: (b)'s student tokens/s over a plain torch loop on the same tensors in memory (same
model, AdamW, one thread; the mean of 45 s just before (b) and 45 s just after it), and
the train worker's peak RSS with 10x the data over 1x. Before each variant the machine's
speed is probed (one thread's matmul GFLOP/s) and printed with the results: these
machines change phase within a run, and the probes say when a ratio straddles a change.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import sharing
from bench.common import SMOLLM2, TEXTS, machine_gflops, report, scratch, student_step

PLAYS = ["macbeth", "tempest", "comedy_of_errors", "julius_caesar", "twelfth_night",
         "othello", "hamlet", "lear", "richard_iii", "henry_v"]


# teacher.dtype of every variant: auto (the default) is bf16 on a CPU with bf16
# instructions, where the teacher is ~1.6x faster than in fp32; `--teacher-dtype float32`
# gives the workload of the runs before 2026-12-07's thirteenth session, with a ~ b.
TEACHER_DTYPE = "auto"


def job(out: str, name: str, plays: list[str], seq_len: int, **train) -> dict:
    colocated = train.pop("colocated", False)
    return {
        "run": {"name": name, "output_dir": out},
        "data": {"source": [f"{TEXTS}/{p}_gut.txt" for p in plays], "seq_len": seq_len,
                 "eval_fraction": 0.02, "eval_max_samples": 8},
        "teacher": {"model": SMOLLM2, "batch_size": 8, "num_cpus": 1, "colocated": colocated,
                    "dtype": TEACHER_DTYPE},
        "student": {"num_layers": 4, "init_from_teacher": True},
        "labels": {"cache": f"{out}/cache-{name}"},
        "train": {"batch_size": 8, "micro_batch_size": 8, "lr": 1e-3, "log_every": 10,
                  "cpus_per_worker": 2 if colocated else 1, **train},
    }


class _Printed(dict):
    def __setitem__(self, key: str, seconds: float) -> None:
        print(f"{key}: {seconds:.1f} s", flush=True)
        super().__setitem__(key, seconds)


class _Probes(dict):
    """The machine's speed (bench.common.machine_gflops) just before each variant."""

    def before(self, key: str) -> None:
        self[key] = machine_gflops()
        print(f"machine before {key}: {self[key]} GFLOP/s", flush=True)


def plain_torch_tokens_per_s(rows: dict[str, np.ndarray], seconds: float = 60.0) -> float:
    """The student trained by a bare loop over in-memory tensors: the ceiling for (b)."""
    import torch

    torch.set_num_threads(1)
    step = student_step()
    tokens, spent, i = 0, 0.0, 0
    n = len(rows["sample_index"])
    while spent < seconds:
        sel = slice(i % n, i % n + 8)
        batch = {k: torch.from_numpy(np.ascontiguousarray(v[sel])) for k, v in rows.items()}
        start = time.perf_counter()
        tokens += step(batch)
        spent += time.perf_counter() - start
        i += 8
    return tokens / spent


def memory(out: str, plays: int) -> dict[str, float]:
    """Train-worker peak RSS on 1x and 10x the data, tiny random models (only how the
    worker's footprint grows with the data matters, and these train 10x in minutes)."""
    from pathlib import Path

    from raykd.config import job_from_dict
    from raykd.runner import run
    from tests.tiny import make_llama

    teacher = make_llama(Path(out) / "tiny-teacher", layers=2, hidden=64)
    rss = {}
    for label, n in (("1x", max(1, plays // 10)), ("10x", plays)):
        spec = {"run": {"name": f"mem{label}", "output_dir": out},
                "data": {"source": [f"{TEXTS}/{p}_gut.txt" for p in PLAYS[:n]],
                         "seq_len": 64, "eval_fraction": 0.01, "eval_max_samples": 8},
                "teacher": {"model": str(teacher), "batch_size": 32},
                "labels": {"top_k": 16, "cache": None},
                "student": {"num_layers": 1},
                "train": {"batch_size": 32, "micro_batch_size": 32, "log_every": 50}}
        rss[label] = run(job_from_dict(spec), log=lambda _: None).summary["worker_peak_rss_mb"]
    return rss


def shuffle_cost(plays: list[str], seq_len: int) -> None:
    """(c) with data.shuffle on and off, ABBA so that a drift of the machine's speed
    falls on both alike."""
    import ray

    from raykd.config import job_from_dict
    from raykd.runner import run

    out = scratch("raykd-speed-")
    seconds: dict[str, list[float]] = {"on": [], "off": []}
    walls: dict[str, list[float]] = {"on": [], "off": []}
    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False)
    try:
        for i, mode in enumerate(["on", "off", "off", "on"]):
            spec = job(out, f"c-{mode}-{i}", plays, seq_len)
            spec["data"]["shuffle"] = mode == "on"
            s = run(job_from_dict(spec), log=lambda _: None).summary
            seconds[mode].append(s["epoch0_s"])
            walls[mode].append(s["wall_s"])
            print(f"c, shuffle {mode}: epoch {s['epoch0_s']:.1f} s, wall {s['wall_s']:.1f} s",
                  flush=True)
    finally:
        ray.shutdown()
    report("shuffle_cost", {
        "sequences": s["train_sequences"], "seq_len": seq_len,
        "epoch0_s": seconds, "wall_s": walls,
        "epoch_on_over_off": round(sum(seconds["on"]) / sum(seconds["off"]), 3),
        "wall_on_over_off": round(sum(walls["on"]) / sum(walls["off"]), 3),
    })


def labels_in_memory(cache: str) -> Any:
    """Every row of a filled cache as the pipeline reads it, materialized in the object
    store: what (b) trains on."""
    from raykd.data.cache_source import read_cache
    from raykd.data.label_cache import LabelCache, Lineage
    from raykd.data.samples import SampleSet

    lineage = Lineage.from_json(Path(cache, "lineage.json").read_text())
    ids = np.unique(np.concatenate(LabelCache(cache, lineage).index().ids))
    return read_cache(cache, lineage, SampleSet.of(int(ids.max()) + 1, ids)).materialize()


def cache_vs_memory(plays: list[str], seq_len: int) -> None:
    """An epoch read from the label cache against one on labels in memory, in one worker
    (X), and a worker's second epoch against its first with both from the cache (Y)."""
    import ray

    from raykd.config import job_from_dict
    from raykd.runner import label_only, run

    out = scratch("raykd-speed-")
    quiet = lambda _: None  # noqa: E731
    epochs: dict[str, list[float]] = {}
    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False)
    try:
        cache = label_only(job_from_dict(job(out, "a", plays, seq_len)), log=quiet)["cache"]
        in_memory = labels_in_memory(cache)
        for name, first in (("X", in_memory), ("Y", None)):
            spec = {**job(out, name, plays, seq_len, epochs=2), "labels": {"cache": cache}}
            s = run(job_from_dict(spec), log=quiet, first_epoch=first).summary
            epochs[name] = [s["epoch0_s"], s["epoch1_s"]]
            print(f"{name}: epochs {epochs[name][0]:.1f} s, {epochs[name][1]:.1f} s", flush=True)
    finally:
        ray.shutdown()
    x, y = (epochs[k][1] / epochs[k][0] for k in ("X", "Y"))
    report("cache_vs_memory", {
        "sequences": s["train_sequences"], "seq_len": seq_len, "epoch_s": epochs,
        "x_cache_epoch2_over_memory_epoch1": round(x, 3),
        "y_cache_epoch2_over_cache_epoch1": round(y, 3),
        "cache_over_memory_second_epoch_effect_removed": round(x / y, 3),
    })


def main() -> None:
    import ray

    from raykd.config import job_from_dict
    from raykd.pipeline import collect
    from raykd.runner import label_only, run
    from raykd.teacher.config import TeacherConfig
    from raykd.teacher.replica import resolve_dtype

    ap = argparse.ArgumentParser()
    ap.add_argument("--plays", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--memory-plays", type=int, default=10)
    ap.add_argument("--shuffle-cost", action="store_true",
                    help="only (c), with data.shuffle on and off")
    ap.add_argument("--cache-vs-memory", action="store_true",
                    help="only an epoch from the cache against one in memory, in one worker")
    ap.add_argument("--teacher-dtype", default="auto",
                    choices=["auto", "float32", "bfloat16"])
    args = ap.parse_args()
    global TEACHER_DTYPE
    TEACHER_DTYPE = args.teacher_dtype
    plays = PLAYS[: args.plays]
    if args.shuffle_cost:
        shuffle_cost(plays, args.seq_len)
        return
    if args.cache_vs_memory:
        cache_vs_memory(plays, args.seq_len)
        return
    out = scratch("raykd-speed-")
    quiet = lambda _: None  # noqa: E731
    t = _Printed()  # each variant's seconds are printed as they come, kept if a run dies
    probe = _Probes()
    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False)
    try:
        # The order is a, b, c, d, e, c, b, a: this machine's speed drifts by up to 1.7x
        # within a run, and the mean of each pair (a, b, c) is then centred on the same
        # moment as (d) and (e), so a drift that is linear over the run cancels out of
        # every ratio. Each repeat starts from an empty cache, as its first run did.
        # (a) teacher only, into its own cache.
        probe.before("a1")
        a = label_only(job_from_dict(job(out, "a", plays, args.seq_len)), log=quiet)
        t["a1_teacher_only"] = a["label_s"]
        cache = a["cache"]
        in_memory = labels_in_memory(cache)  # the pipeline's blocks
        # (b) student only, labels in memory, between two plain torch loops over the same
        # rows: the ratio of the two compares steps minutes, not a quarter of an hour, apart.
        rows = collect(in_memory, None)
        plain = [plain_torch_tokens_per_s(rows, 45.0)]
        probe.before("b1")
        b = run(job_from_dict(job(out, "b", plays, args.seq_len)), log=quiet,
                first_epoch=in_memory).summary
        t["b1_student_only"] = b["epoch0_s"]
        plain.append(plain_torch_tokens_per_s(rows, 45.0))
        # (c) streamed.
        probe.before("c1")
        c = run(job_from_dict(job(out, "c", plays, args.seq_len)), log=quiet).summary
        t["c1_streamed"] = c["epoch0_s"]
        # (d) label then train: (a), the mean of both, + one epoch from storage; and (f),
        # the second epoch of that run, from the same cache.
        probe.before("d")
        d = run(job_from_dict({**job(out, "d", plays, args.seq_len, epochs=2),
                               "labels": {"cache": cache}}), log=quiet).summary
        t["d_train_from_storage"] = d["epoch0_s"]
        t["f_epoch2_from_cache"] = d["epoch1_s"]
        # (e) co-located teacher.
        probe.before("e")
        e = run(job_from_dict(job(out, "e", plays, args.seq_len, colocated=True)),
                log=quiet).summary
        t["e_colocated"] = e["epoch0_s"]
        # The repeats, in reverse order.
        probe.before("c2")
        c2 = run(job_from_dict(job(out, "c2", plays, args.seq_len)), log=quiet).summary
        t["c2_streamed"] = c2["epoch0_s"]
        probe.before("b2")
        b2 = run(job_from_dict(job(out, "b2", plays, args.seq_len)), log=quiet,
                 first_epoch=in_memory).summary
        t["b2_student_only"] = b2["epoch0_s"]
        probe.before("a2")
        t["a2_teacher_only"] = label_only(job_from_dict(job(out, "a2", plays, args.seq_len)),
                                          log=quiet)["label_s"]
        rss = memory(out, args.memory_plays)
    finally:
        ray.shutdown()
    mean = {k: (t[f"{k}1_{name}"] + t[f"{k}2_{name}"]) / 2 for k, name in
            (("a", "teacher_only"), ("b", "student_only"), ("c", "streamed"))}
    a_s, b_s, c_s = mean["a"], mean["b"], mean["c"]
    d_s = a_s + t["d_train_from_storage"]
    # What the two cores cost teacher and student when both are busy, without raykd.
    shared = sharing.measure(teacher_dtype=TEACHER_DTYPE)
    c_floor = sharing.floor(a_s, b_s, shared["teacher_slowdown"], shared["student_slowdown"])
    b_tps = b["tokens"] / t["b1_student_only"]
    report("speed", {
        "sequences": c["train_sequences"], "seq_len": args.seq_len,
        "teacher_dtype": resolve_dtype(TeacherConfig(model=SMOLLM2, dtype=TEACHER_DTYPE)),
        "seconds": dict(t),
        "mean_of_pairs_s": {"a": round(a_s, 1), "b": round(b_s, 1), "c": round(c_s, 1),
                            "d": round(d_s, 1)},
        "c_over_max_a_b": round(c_s / max(a_s, b_s), 3),
        # When (c)'s student took the idle teacher's CPU (raykd.student.threads), from the
        # start of its epoch, and its threads then; (b), (d) and (f) keep one thread.
        "c_threads_raised_after_s": [c["threads_raised_after_s"], c2["threads_raised_after_s"]],
        "c_threads": [c["student_threads"], c2["student_threads"]],
        "b_d_threads": [b["student_threads"], b2["student_threads"], d["student_threads"]],
        "c_over_max_a_b_first_and_second_half": [
            round(t[f"c{i}_streamed"] / max(t[f"a{i}_teacher_only"], t[f"b{i}_student_only"]), 3)
            for i in (1, 2)],
        "sharing": shared,
        "c_over_max_a_b_from_sharing_alone": round(c_floor, 3),
        "c_over_sharing_floor": round(c_s / (c_floor * max(a_s, b_s)), 3),
        "d_over_c": round(d_s / c_s, 3),
        "e_over_c": round(t["e_colocated"] / c_s, 3),
        "epoch2_over_b": round(t["f_epoch2_from_cache"] / b_s, 3),
        "a_over_b": round(a_s / b_s, 3),
        "machine_gflops_before": dict(probe),
        "student_tokens_per_s_ray": round(b_tps, 1),
        "student_tokens_per_s_plain_torch_before_after_b": [round(x, 1) for x in plain],
        "ray_over_plain": round(b_tps / float(np.mean(plain)), 3),
        "worker_peak_rss_mb": rss, "rss_10x_over_1x": round(rss["10x"] / rss["1x"], 3),
        "goals": {"c_over_max_a_b": "<= 1.10", "d_over_c": ">= 1.6 when a ~ b",
                  "epoch2_over_b": "<= 1.05", "ray_over_plain": ">= 0.90",
                  "rss_10x_over_1x": "<= 1.10"},
    })


if __name__ == "__main__":
    main()
