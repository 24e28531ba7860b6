"""DeepSpeed config, optimiser and learning-rate schedule for the student."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from raykd.student.config import TrainConfig


def zero_stage(train: TrainConfig, world_size: int) -> int:
    """The ZeRO stage the engine runs. Stages 1 and 2 split the optimiser state and the
    gradients across the data-parallel ranks; with one rank there is nothing to split,
    and DeepSpeed still keeps its flat fp32 partition: one more copy of the weights, and
    8 % longer CPU steps than stage 0 (bench.zero_step, docs/benchmarks.md). One worker
    therefore runs stage 0: the same AdamW, clipping and accumulation. Stage 3 is kept as
    asked: it also changes how the model is built and gathered, which a one-worker run may
    be trying out. A run resumes only with its own job, so always at the same stage."""
    return 0 if world_size == 1 and train.zero_stage in (1, 2) else train.zero_stage


def describe_zero(train: TrainConfig) -> str:
    """For the logs: the stage that runs, and why when it is not the one asked for."""
    stage = zero_stage(train, train.num_workers)
    if stage == train.zero_stage:
        return f"ZeRO-{stage}"
    return f"ZeRO-{stage} (ZeRO-{train.zero_stage} has nothing to partition on one worker)"


def deepspeed_config(train: TrainConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON config for this job. The optimiser is a torch AdamW passed to
    `deepspeed.initialize` (DeepSpeed's own would JIT-compile fused_adam, minutes on CPU)."""
    zero: dict[str, Any] = {"stage": zero_stage(train, world_size)}
    return {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum_steps,
        "train_batch_size": train.micro_batch_size * train.grad_accum_steps * world_size,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": train.bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def optimizer(model: torch.nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=train.lr, betas=tuple(train.betas))


def lr_lambda(train: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak lr at optimiser step `step`: linear warmup, then decay."""
    warmup = min(train.warmup_steps, max(total_steps - 1, 0))
    floor = train.min_lr_ratio

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if train.schedule == "constant" or total_steps <= warmup:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup - 1))
        if train.schedule == "linear":
            return 1.0 - (1.0 - floor) * progress
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f
