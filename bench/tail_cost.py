"""What the tail draws cost the teacher: labelling time with `labels.tail_samples` = m
against m = 0, the same batches, side by side in one process.

    python -m bench.tail_cost [--batches 6] [--samples 64] [--threads 2]

Two TeacherReplicas of SmolLM2-135M-Instruct (fp32, top-64, compact), one drawing m ids
per position from the teacher's distribution outside the top-64 and one not, are called
in turn on the same batches of 8 x 128 Hamlet tokens (the order alternates every batch,
so a slow phase of the machine falls on both). Prints seconds per batch of each and the
ratio m / 0: the forward is the same, so the difference is the draws, their entropy and
their bytes.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bench.common import SMOLLM2, report, shakespeare_ids


def main() -> None:
    import torch

    from raykd.data.soft_labels import LabelConfig
    from raykd.teacher.config import TeacherConfig
    from raykd.teacher.replica import TeacherReplica

    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ids = shakespeare_ids("hamlet", (args.batches + 1) * 8, 128)
    batches = [{"sample_id": np.arange(i, i + 8), "input_ids": ids[i:i + 8],
                "length": np.full(8, 128, np.int32)} for i in range(0, len(ids), 8)]
    replicas = {m: TeacherReplica(TeacherConfig(model=SMOLLM2),
                                  LabelConfig(top_k=64, tail_samples=m))
                for m in (0, args.samples)}
    seconds = dict.fromkeys(replicas, 0.0)
    for replica in replicas.values():
        replica(batches[0])  # warm up
    for i, batch in enumerate(batches[1:]):
        for m in (sorted(replicas) if i % 2 else sorted(replicas, reverse=True)):
            start = time.perf_counter()
            replicas[m](batch)
            seconds[m] += time.perf_counter() - start
    per_batch = {m: s / args.batches for m, s in seconds.items()}
    report("tail_cost", {
        "teacher": "SmolLM2-135M-Instruct fp32, top-64 compact", "threads": args.threads,
        "batches": args.batches, "tokens_per_batch": 8 * 128,
        "seconds_per_batch": {f"tail_samples_{m}": round(s, 3) for m, s in per_batch.items()},
        f"tail_samples_{args.samples}_over_0": round(per_batch[args.samples] / per_batch[0], 3),
    })


if __name__ == "__main__":
    main()
