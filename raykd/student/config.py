"""The student model, its loss and how Ray Train + DeepSpeed train it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from raykd.errors import ConfigError
from raykd.fields import doc


@dataclass
class StudentConfig:
    """A smaller model of the teacher's family, sharing its tokenizer."""

    kind: Literal["hf_causal_lm"] = doc(
        "hf_causal_lm", "Student family: a Hugging Face causal LM."
    )
    model: str | None = doc(
        None, "Start from this pretrained model (directory, hub id, .gguf or pkg://) instead "
        "of building one from the teacher's config; it must use the teacher's tokenizer."
    )
    vocab: Literal["strict", "truncate"] = doc(
        "strict", "When teacher and student share a tokenizer but pad their vocabularies to "
        "different sizes (e.g. 152,064 vs 151,936 logits): strict refuses; truncate compares "
        "both over the tokenizer's tokens only."
    )
    num_layers: int = doc(4, "Transformer layers (when built from the teacher's config).")
    hidden_size: int | None = doc(None, "Hidden size; null keeps the teacher's.")
    intermediate_size: int | None = doc(None, "MLP width; null keeps the teacher's.")
    num_attention_heads: int | None = doc(None, "Attention heads; null keeps the teacher's.")
    num_key_value_heads: int | None = doc(None, "KV heads (GQA); null keeps the teacher's.")
    init_from_teacher: bool = doc(
        False,
        "Copy the teacher's embeddings, final norm and evenly spaced layers into the "
        "student (DistilBERT-style); needs the teacher's hidden and MLP sizes.",
    )
    init_layers: list[int] | None = doc(
        None, "Teacher layer index for each student layer; null spaces them evenly."
    )

    def validate(self) -> None:
        if self.model is not None and (self.init_from_teacher or self.hidden_size or
                                       self.intermediate_size or self.num_attention_heads or
                                       self.num_key_value_heads):
            raise ConfigError("model", "a pretrained student brings its own shape and weights; "
                              "unset init_from_teacher and the size keys")
        if self.num_layers < 1:
            raise ConfigError("num_layers", f"must be >= 1, got {self.num_layers}")
        for name in ("hidden_size", "intermediate_size", "num_attention_heads",
                     "num_key_value_heads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(name, f"must be >= 1, got {value}")
        if self.init_layers is not None:
            if not self.init_from_teacher:
                raise ConfigError("init_layers", "is set but init_from_teacher is false")
            if len(self.init_layers) != self.num_layers:
                raise ConfigError(
                    "init_layers",
                    f"has {len(self.init_layers)} entries but num_layers is {self.num_layers}",
                )
            if any(i < 0 for i in self.init_layers):
                raise ConfigError("init_layers", "layer indices must be >= 0")
        if self.init_from_teacher and (
            self.hidden_size is not None
            or self.intermediate_size is not None
            or self.num_attention_heads is not None
            or self.num_key_value_heads is not None
        ):
            raise ConfigError(
                "init_from_teacher",
                "copies teacher weights, so hidden_size, intermediate_size and head counts "
                "must stay null (the teacher's)",
            )


@dataclass
class LossConfig:
    """loss = alpha * T^2 * KL(teacher_T, student_T) + (1 - alpha) * CE(next token)."""

    alpha: float = doc(0.5, "Weight of the distillation term; 1 - alpha weights cross-entropy.")
    kind: Literal["forward_kl", "reverse_kl"] = doc(
        "forward_kl", "forward_kl = KL(teacher || student), mode-covering; reverse_kl = "
        "KL(student || teacher), mode-seeking."
    )

    def validate(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError("alpha", f"must be in [0, 1], got {self.alpha}")


@dataclass
class TrainConfig:
    """Ray Train workers running DeepSpeed ZeRO."""

    num_workers: int = doc(1, "Ray Train workers (data-parallel ranks).")
    use_gpu: bool = doc(False, "One GPU per worker with NCCL; false trains on CPU with gloo.")
    cpus_per_worker: float = doc(1.0, "CPUs reserved by each worker (its torch threads on CPU).")
    reuse_teacher_cpus: bool = doc(
        True, "On CPU, once the teacher pool has labelled all it has to, each worker also "
        "runs torch on its share of the CPUs the pool's replicas held on its node."
    )
    resources: dict[str, float] = doc(
        {}, "Custom Ray resources each worker needs, e.g. {student: 1} for student nodes."
    )
    node_labels: dict[str, str] = doc(
        {}, "Ray node labels a worker's node must carry, e.g. {raykd.io/role: student}. "
        "Ignored on embedded Ray (one node)."
    )
    batch_size: int = doc(8, "Sequences per optimiser step, across all workers.")
    micro_batch_size: int = doc(
        8, "Sequences per forward pass on one worker; the rest is gradient accumulation."
    )
    epochs: int = doc(1, "Passes over the training sequences.")
    max_steps: int | None = doc(None, "Stop after this many optimiser steps; null runs all epochs.")
    lr: float = doc(5e-4, "Peak learning rate (AdamW).")
    min_lr_ratio: float = doc(0.1, "Final learning rate as a fraction of lr.")
    warmup_steps: int = doc(10, "Linear warmup steps.")
    schedule: Literal["cosine", "linear", "constant"] = doc(
        "cosine", "Decay after warmup, down to lr x min_lr_ratio."
    )
    weight_decay: float = doc(0.0, "AdamW weight decay.")
    betas: list[float] = doc([0.9, 0.95], "AdamW betas.")
    grad_clip: float = doc(1.0, "Gradient norm clipping; 0 disables.")
    zero_stage: int = doc(2, "DeepSpeed ZeRO stage 0-3. With one worker, 1 and 2 run as 0: "
                             "there is nothing to partition.")
    precision: Literal["auto", "fp32", "bf16"] = doc(
        "auto", "Training precision; auto is bf16 on GPU and fp32 on CPU."
    )
    log_every: int = doc(5, "Report metrics every N optimiser steps.")
    eval_every: int = doc(0, "Evaluate every N steps; 0 evaluates at the start and the end only.")
    checkpoint_every: int = doc(0, "Checkpoint every N steps; 0 checkpoints at the end only.")
    storage: str | None = doc(
        None, "Checkpoint storage (local dir or s3://...); null is <run dir>/checkpoints."
    )
    max_failures: int = doc(0, "Worker-group restarts Ray Train may make before failing.")

    def validate(self) -> None:
        for name in ("num_workers", "batch_size", "micro_batch_size", "epochs", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError("max_steps", f"must be >= 1, got {self.max_steps}")
        if not 0 <= self.zero_stage <= 3:
            raise ConfigError("zero_stage", f"must be 0-3, got {self.zero_stage}")
        if self.lr <= 0:
            raise ConfigError("lr", f"must be > 0, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError("min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("warmup_steps", "eval_every", "checkpoint_every", "max_failures"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            bad = "weight_decay" if self.weight_decay < 0 else "grad_clip"
            raise ConfigError(bad, f"must be >= 0, got {getattr(self, bad)}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError("betas", f"must be two numbers in [0, 1), got {self.betas}")
        if self.cpus_per_worker <= 0:
            raise ConfigError("cpus_per_worker", f"must be > 0, got {self.cpus_per_worker}")
        for name, amount in self.resources.items():
            if amount <= 0:
                raise ConfigError(f"resources.{name}", f"must be > 0, got {amount}")
        if self.precision == "bf16" and not self.use_gpu:
            raise ConfigError("precision", "bf16 needs use_gpu: true (CPU trains in fp32)")

    @property
    def grad_accum_steps(self) -> int:
        return self.batch_size // (self.micro_batch_size * self.num_workers)

    @property
    def bf16(self) -> bool:
        return self.precision == "bf16" or (self.precision == "auto" and self.use_gpu)
