"""What two busy processes cost each other on this machine, without raykd in between.

    python -m bench.sharing [--seconds 45]

bench.speed's streamed run (c) puts the teacher (1 thread) and the student (1 thread) on
the machine's cores at the same time; its goal c / max(a, b) <= 1.10 assumes that two
processes on two cores run as fast as each does alone. This measures that assumption
with the same two workloads as plain loops in two processes, no Ray, no pipeline:

  teacher  SmolLM2-135M-Instruct forward on 8 x 128 tokens + top-64 compact labels
           (raykd's TeacherReplica, called directly)
  student  the quickstart's 4-layer student: one step on those labels (chunked head and
           loss, AdamW; as bench.speed's plain torch loop)

each alone, then both at once, one torch thread each. Prints each one's slowdown when
sharing, and the c / max(a, b) that sharing alone would give for given a and b
(`floor`): the part of bench.speed's ratio the pipeline could not remove on this machine.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time

B, L = 8, 128


def _batch() -> dict:
    import numpy as np

    from bench.common import shakespeare_ids

    ids = shakespeare_ids("macbeth", B, L)
    return {"input_ids": ids, "length": np.full((B,), L, dtype=np.int32),
            "sample_index": np.arange(B, dtype=np.int64)}


def _teacher(dtype: str = "auto"):
    from bench.common import SMOLLM2
    from raykd.data.soft_labels import LabelConfig
    from raykd.teacher.config import TeacherConfig
    from raykd.teacher.replica import TeacherReplica

    replica = TeacherReplica(TeacherConfig(model=SMOLLM2, num_cpus=1, dtype=dtype),
                             LabelConfig())
    batch = _batch()
    return lambda: replica(batch)


def _student():
    from bench.common import labelled_batch, student_step

    batch, step = labelled_batch(B, L), student_step()
    return lambda: step(batch)


def _worker(kind: str, seconds: float, start: mp.Barrier, out: mp.Queue,
            teacher_dtype: str) -> None:
    import torch

    torch.set_num_threads(1)
    work = _teacher(teacher_dtype) if kind == "teacher" else _student()
    work()  # warm-up: first-call allocations and lazy inits stay out of the rate
    start.wait()
    began, n = time.perf_counter(), 0
    while time.perf_counter() - began < seconds:
        work()
        n += 1
    out.put((kind, (time.perf_counter() - began) / n))


def seconds_per_iteration(kinds: list[str], seconds: float,
                          teacher_dtype: str = "auto") -> dict[str, float]:
    """Each kind in its own process; all start their timed loops together."""
    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(len(kinds)), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(k, seconds, start, out, teacher_dtype))
             for k in kinds]
    for p in procs:
        p.start()
    got = dict(out.get() for _ in procs)
    for p in procs:
        p.join()
    return got


def floor(a: float, b: float, teacher_slowdown: float, student_slowdown: float) -> float:
    """c / max(a, b) if the pipeline cost nothing but the two sharing the machine: both
    run slowed until the one that finishes first is done, then the other runs alone."""
    if a * teacher_slowdown <= b * student_slowdown:
        together = a * teacher_slowdown
        c = together + b - together / student_slowdown
    else:
        together = b * student_slowdown
        c = together + a - together / teacher_slowdown
    return c / max(a, b)


def measure(seconds: float = 45.0, teacher_dtype: str = "auto") -> dict[str, float]:
    alone = {**seconds_per_iteration(["teacher"], seconds, teacher_dtype),
             **seconds_per_iteration(["student"], seconds)}
    shared = seconds_per_iteration(["teacher", "student"], seconds, teacher_dtype)
    return {"teacher_s_alone": round(alone["teacher"], 3),
            "student_s_alone": round(alone["student"], 3),
            "teacher_s_shared": round(shared["teacher"], 3),
            "student_s_shared": round(shared["student"], 3),
            "teacher_slowdown": round(shared["teacher"] / alone["teacher"], 3),
            "student_slowdown": round(shared["student"] / alone["student"], 3)}


def main() -> None:
    from bench.common import report

    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=45.0)
    ap.add_argument("--a", type=float, help="bench.speed's (a): print the floor for it")
    ap.add_argument("--b", type=float, help="bench.speed's (b)")
    args = ap.parse_args()
    got = measure(args.seconds)
    if args.a and args.b:
        got["c_over_max_a_b_floor"] = round(
            floor(args.a, args.b, got["teacher_slowdown"], got["student_slowdown"]), 3)
    report("sharing", got)


if __name__ == "__main__":
    main()
