"""Epoch 2 from the label cache vs training on labels held in memory ("student-only").

    python -m bench.cache_epoch [--plays 1] [--seq-len 128]

Run A: the quickstart setup (SmolLM2 teacher, 4-layer student, 1 worker) for 2 epochs on
a fresh cache: epoch 1 streams from the teacher and writes the cache, epoch 2 reads it.
Run B: the same student trained for 1 epoch on the very same labels, materialised in
Ray's object store beforehand (no teacher, no parquet). Both epoch times are measured
inside the train loop (first batch request to last step). Prints epoch-2 / student-only
(goal <= 1.05) and epoch-1 / epoch-2 (what the cache saves).
"""

from __future__ import annotations

import argparse
import tempfile

from bench.common import SMOLLM2, TEXTS, report

PLAYS = ["macbeth", "tempest", "comedy_of_errors", "julius_caesar"]


def job(out: str, name: str, plays: list[str], seq_len: int, epochs: int) -> dict:
    return {
        "run": {"name": name, "output_dir": out},
        "data": {"source": [f"{TEXTS}/{p}_gut.txt" for p in plays], "seq_len": seq_len,
                 "eval_fraction": 0.02, "eval_max_samples": 8},
        "teacher": {"model": SMOLLM2, "batch_size": 8},
        "student": {"num_layers": 4, "init_from_teacher": True},
        "train": {"epochs": epochs, "batch_size": 8, "micro_batch_size": 8, "lr": 1e-3,
                  "log_every": 10},
    }


def main() -> None:
    import ray

    from raykd.config import job_from_dict
    from raykd.data.cache_source import CacheSource
    from raykd.runner import run

    ap = argparse.ArgumentParser()
    ap.add_argument("--plays", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=128)
    args = ap.parse_args()
    plays = PLAYS[: args.plays]
    out = tempfile.mkdtemp(prefix="raykd-bench-")
    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False)
    try:
        a = run(job_from_dict(job(out, "two-epochs", plays, args.seq_len, 2)),
                log=lambda _: None).summary
        from raykd.data.label_cache import Lineage

        cache = a["label_cache"]
        lineage = Lineage.from_json(open(f"{cache}/lineage.json").read())
        import numpy as np

        from raykd.data.label_cache import LabelCache

        ids = LabelCache(cache, lineage).index().cached_ids()
        in_memory = ray.data.read_datasource(CacheSource(cache, lineage, np.asarray(ids))
                                             ).materialize()
        b = run(job_from_dict(job(out, "student-only", plays, args.seq_len, 1)),
                log=lambda _: None, first_epoch=in_memory).summary
    finally:
        ray.shutdown()
    report("cache_epoch", {
        "sequences": a["train_sequences"], "seq_len": args.seq_len,
        "epoch1_teacher_s": a["epoch0_s"], "epoch2_cache_s": a["epoch1_s"],
        "student_only_s": b["epoch0_s"],
        "epoch2_over_student_only": round(a["epoch1_s"] / b["epoch0_s"], 3),
        "epoch1_over_epoch2": round(a["epoch0_s"] / a["epoch1_s"], 3),
        "goal": "epoch2_over_student_only <= 1.05"})


if __name__ == "__main__":
    main()
