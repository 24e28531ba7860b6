"""How the teacher is loaded and how its replica pool is sized."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from raykd.errors import ConfigError
from raykd.fields import doc, required


@dataclass
class ReplicasConfig:
    """Bounds of the teacher actor pool (Ray Data ActorPoolStrategy)."""

    min: int = doc(1, "Replicas kept alive at least.")
    max: int = doc(1, "Replicas the pool may grow to while labels are the bottleneck.")

    def validate(self) -> None:
        if self.min < 1:
            raise ConfigError("min", "must be >= 1 (Ray Data pools cannot scale to 0), "
                              f"got {self.min}")
        if self.max < self.min:
            raise ConfigError("max", f"must be >= teacher.replicas.min ({self.min}), "
                              f"got {self.max}")


@dataclass
class TeacherConfig:
    """The model whose soft labels the student learns from."""

    kind: Literal["hf_causal_lm"] = doc("hf_causal_lm", "Teacher family: a Hugging Face causal LM.")
    model: str = required(
        "A Hugging Face model directory, a hub id (where a hub is reachable), a .gguf file, "
        "or pkg://DISTRIBUTION/path for a model that ships in a Python package."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = doc(
        "auto", "Inference dtype; auto is bfloat16 on GPU and on CPUs with bfloat16 "
        "instructions (AVX512-BF16, AMX), float32 on other CPUs."
    )
    batch_size: int = doc(8, "Sequences per teacher forward pass.")
    tp_size: int = doc(
        1, "Tensor-parallel ranks per replica (DeepSpeed inference AutoTP): one Ray actor "
        "owns tp_size devices and runs the teacher split across tp_size local processes."
    )
    replicas: ReplicasConfig = doc(ReplicasConfig(), "Size of the teacher pool.")
    num_cpus: float = doc(1.0, "CPUs reserved by each replica (its torch thread count on CPU).")
    num_gpus: float = doc(0.0, "GPUs reserved by each replica; > 0 runs the teacher on CUDA.")
    resources: dict[str, float] = doc(
        {}, "Custom Ray resources each replica needs, e.g. {teacher: 1} to run replicas only "
        "on nodes started with that resource (KubeRay: a worker group's rayStartParams)."
    )
    node_labels: dict[str, str] = doc(
        {}, "Ray node labels a replica's node must carry, e.g. {raykd.io/role: teacher} "
        "(KubeRay: workerGroupSpecs[].labels). Ignored on embedded Ray (one node)."
    )
    colocated: bool = doc(
        False, "Run the teacher's forward inside every student step, on the train workers "
        "(the TRL / torchdistill way), instead of in a pool that streams labels; no label "
        "cache. For comparison (bench/speed.py) and for teachers small enough to share a "
        "worker. With labels.top_k equal to the vocabulary the KL is the dense one."
    )

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ConfigError("batch_size", f"must be >= 1, got {self.batch_size}")
        if self.tp_size < 1:
            raise ConfigError("tp_size", f"must be >= 1, got {self.tp_size}")
        if self.tp_size > 1 and self.num_gpus and self.num_gpus != self.tp_size:
            raise ConfigError("num_gpus", f"a tensor-parallel replica owns one GPU per rank: "
                              f"set num_gpus to tp_size ({self.tp_size}), got {self.num_gpus}")
        if self.num_cpus < 0:
            raise ConfigError("num_cpus", f"must be >= 0, got {self.num_cpus}")
        if self.num_gpus < 0:
            raise ConfigError("num_gpus", f"must be >= 0, got {self.num_gpus}")
        for name, amount in self.resources.items():
            if amount <= 0:
                raise ConfigError(f"resources.{name}", f"must be > 0, got {amount}")
        if self.colocated and self.tp_size > 1:
            raise ConfigError("colocated", "a co-located teacher runs on each train worker "
                              "without tensor parallelism; set teacher.tp_size to 1")
        if self.num_cpus == 0 and self.num_gpus == 0:
            raise ConfigError("num_cpus", "a replica needs CPUs or GPUs; both are 0")

    @property
    def on_gpu(self) -> bool:
        return self.num_gpus > 0
