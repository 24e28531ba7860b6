"""Teacher throughput: one replica with tp=1 vs one with tp=2 (DeepSpeed AutoTP), same
CPUs, same batches, side by side in one run.

    python -m bench.teacher_tp [--batches 6] [--batch-size 8] [--seq-len 128]

Each replica is a Ray actor holding 2 CPUs: tp=1 runs SmolLM2 with 2 torch threads,
tp=2 splits it over 2 ranks of 1 thread each. Prints teacher tokens/s of both and the
ratio. (On a 2-core CPU the split mostly adds all-reduce traffic; tensor parallelism pays
off when one device cannot hold or feed the teacher — GPUs.)
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bench.common import SMOLLM2, report, shakespeare_ids


def throughput(tp_size: int, batches: list[np.ndarray]) -> float:
    import ray

    from raykd.data.soft_labels import LabelConfig
    from raykd.teacher.config import TeacherConfig
    from raykd.teacher.replica import TeacherReplica

    replica = ray.remote(num_cpus=2)(TeacherReplica).remote(
        TeacherConfig(model=SMOLLM2, tp_size=tp_size, num_cpus=2), LabelConfig())
    def call(ids):
        return replica.__call__.remote({"sample_id": np.arange(len(ids)), "input_ids": ids,
                                        "length": np.full(len(ids), ids.shape[1], np.int32)})
    ray.get(call(batches[0]))  # load + warm up
    start = time.perf_counter()
    for ids in batches:
        ray.get(call(ids))
    elapsed = time.perf_counter() - start
    ray.kill(replica)
    return sum(b.size for b in batches) / elapsed


def main() -> None:
    import ray

    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    args = ap.parse_args()
    ids = shakespeare_ids("hamlet", args.batches * args.batch_size, args.seq_len)
    batches = [ids[i:i + args.batch_size] for i in range(0, len(ids), args.batch_size)]
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        tp1 = throughput(1, batches)
        tp2 = throughput(2, batches)
    finally:
        ray.shutdown()
    report("teacher_tp", {"teacher": "SmolLM2-135M-Instruct fp32", "cpus_per_replica": 2,
                          "tokens": int(ids.size), "tp1_tokens_per_s": round(tp1, 1),
                          "tp2_tokens_per_s": round(tp2, 1), "tp2_over_tp1": round(tp2 / tp1, 3)})


if __name__ == "__main__":
    main()
