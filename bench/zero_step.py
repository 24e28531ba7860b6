"""The student's step on one worker: plain torch vs DeepSpeed engines, side by side.

    python -m bench.zero_step [--steps 6]

The quickstart's 4-layer student (from the teacher), one micro-batch of 8 x 128 tokens
with top-64 labels, one torch thread; after a warm-up step each, the variants' steps are
interleaved (median seconds per step):

  plain   raykd's chunked head and loss, clipping and AdamW in a bare loop
  zero0   the same model, loss and optimiser in a one-process DeepSpeed engine, stage 0
  zero2   the same at ZeRO-2, forced (raykd now runs one worker's ZeRO-1/2 as stage 0)

ZeRO-1/2 split the optimiser state and gradients across ranks; with one rank there is
nothing to split, yet DeepSpeed keeps a flat fp32 copy of the weights to step and copy
back. This shows what that costs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def main() -> None:
    import deepspeed
    import torch
    from transformers import AutoConfig

    from bench.common import SMOLLM2, labelled_batch, report, student_step
    from raykd.data import soft_labels
    from raykd.student.config import StudentConfig, TrainConfig
    from raykd.student.head_loss import StudentLoss
    from raykd.student.model import build_student
    from raykd.student.optim import deepspeed_config, optimizer
    from raykd.teacher.loading import load_model, materialize
    from tests.ports import free_ports

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    torch.set_num_threads(1)
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_ports(1)[0]))
    deepspeed.init_distributed(dist_backend="gloo")

    batch = labelled_batch()
    teacher_dir = materialize(SMOLLM2)
    teacher_state = load_model(teacher_dir, "float32", "cpu").state_dict()

    def engine_step(stage: int):  # noqa: ANN202
        model = build_student(AutoConfig.from_pretrained(teacher_dir),
                              StudentConfig(num_layers=4, init_from_teacher=True), teacher_state)
        train = TrainConfig(batch_size=8, micro_batch_size=8, lr=1e-3)
        config = deepspeed_config(train, 1)
        config["zero_optimization"]["stage"] = stage
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer(model, train),
                                          config=config)
        loss_fn = StudentLoss(engine, model.config.vocab_size, alpha=0.5, temperature=1.0)

        def step() -> None:
            parts = loss_fn(batch["input_ids"], batch["length"], soft_labels.decode(batch, 1.0))
            engine.backward(parts.loss)
            engine.step()

        return step

    plain = student_step()
    steps = {"plain": lambda: plain(batch), "zero0": engine_step(0), "zero2": engine_step(2)}
    seconds: dict[str, list[float]] = {k: [] for k in steps}
    for step in steps.values():
        step()  # warm-up
    for _ in range(args.steps):
        for name, step in steps.items():
            started = time.perf_counter()
            step()
            seconds[name].append(time.perf_counter() - started)
    median = {k: statistics.median(v) for k, v in seconds.items()}
    report("zero_step", {
        "s_per_step_median": {k: round(v, 3) for k, v in median.items()},
        "s_per_step": {k: [round(x, 2) for x in v] for k, v in seconds.items()},
        "zero0_over_plain": round(median["zero0"] / median["plain"], 3),
        "zero2_over_plain": round(median["zero2"] / median["plain"], 3),
        "zero2_over_zero0": round(median["zero2"] / median["zero0"], 3),
    })


if __name__ == "__main__":
    main()
