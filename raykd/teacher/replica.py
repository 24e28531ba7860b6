"""One teacher replica: a plain callable class that Ray Data runs in an actor pool.

`__init__` loads the teacher once; `__call__(batch)` adds the soft-label columns of
`raykd.data.soft_labels` to a batch of packed sequences. It runs without Ray, too.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any

import numpy as np

from raykd.data import soft_labels
from raykd.data.soft_labels import LabelConfig
from raykd.teacher.config import TeacherConfig


def resolve_dtype(teacher: TeacherConfig) -> str:
    """teacher.dtype, with auto made concrete: bfloat16 on GPU and on a CPU that multiplies
    bfloat16 natively, float32 on other CPUs."""
    if teacher.dtype != "auto":
        return teacher.dtype
    return "bfloat16" if teacher.on_gpu or cpu_has_native_bf16() else "float32"


def resolved(teacher: TeacherConfig) -> TeacherConfig:
    """The config with its dtype made concrete where it is called (the driver), so that the
    replicas compute in the dtype the label cache's lineage names, whatever their CPUs."""
    return dataclasses.replace(teacher, dtype=resolve_dtype(teacher))


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bfloat16 dot-product instructions (AVX512-BF16, AMX-BF16).
    There a teacher's forward in bf16 is 1.6-1.8x faster than in fp32 (SmolLM2-135M, one
    thread, AMD Zen 4), and its labels differ by a KL of ~0.001 nats a token. Without
    them bf16 matmuls are emulated, with no such gain to expect (not measured here)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return bool({"avx512_bf16", "amx_bf16"} & set(line.split(":", 1)[1].split()))
    except OSError:  # not Linux: no such flags to read, stay with fp32
        pass
    return False


class TeacherReplica:
    """Ray Data UDF: packed sequences -> packed sequences + soft labels."""

    def __init__(self, teacher: TeacherConfig, labels: LabelConfig, emit_nll: bool = False,
                 vocab_limit: int | None = None, stats: str | None = None,
                 pass_id: int | None = None):
        import ray
        import torch

        from raykd import telemetry
        from raykd.teacher.loading import load_model, materialize

        if not teacher.on_gpu:
            # Ray sets OMP_NUM_THREADS from num_cpus; torch may have read a default earlier.
            torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.device = "cuda" if teacher.on_gpu else "cpu"
        self.dtype = resolve_dtype(teacher)
        model_dir = materialize(teacher.model)
        if teacher.tp_size > 1:
            from raykd.teacher.tensor_parallel import TPTeacher

            threads = max(1, int(teacher.num_cpus) // teacher.tp_size)
            torch.set_num_threads(threads)
            self.forward = TPTeacher(model_dir, self.dtype, teacher.tp_size,
                                     teacher.on_gpu, threads)
            self.device = str(self.forward.device)
            vocab = self.forward.model.config.vocab_size
        else:
            model = load_model(model_dir, self.dtype, self.device)
            self.forward = lambda ids: model(input_ids=ids).logits
            vocab = model.config.vocab_size
        # student.vocab: truncate cuts padded logits to the tokenizer's tokens on both sides.
        self.vocab_size = vocab_limit or vocab
        self.labels = labels
        self.emit_nll = emit_nll
        # The run's PoolStats (raykd.telemetry): teacher tokens/s and replicas alive.
        self.stats = telemetry.find(stats)
        # Outside Ray (benches, tests) there is no actor id, and asking for the runtime
        # context would start a whole local Ray instance.
        context = ray.get_runtime_context() if ray.is_initialized() else None
        self.replica_id = (context.get_actor_id() or "") if context is not None else ""
        if self.stats is not None:
            node = context.get_node_id() if context is not None else ""
            self.stats.hello.remote(self.replica_id, node, float(teacher.num_cpus), pass_id)
        self.pass_id = pass_id

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        started = time.perf_counter()
        ids = torch.from_numpy(np.ascontiguousarray(batch["input_ids"])).long().to(self.device)
        # Right padding under a causal mask cannot change the logits of real positions,
        # so no attention mask is needed (and the fast SDPA path is kept).
        with torch.no_grad():
            logits = self.forward(ids)[..., : self.vocab_size].float()  # (B, L, V)
            out = label_logits(logits, self.labels, self.vocab_size, batch.get("sample_id"))
            if self.emit_nll:
                out["teacher_nll"] = next_token_nll(logits, ids).cpu().numpy()
        out["labeled_at"] = np.full((ids.shape[0],), time.time(), dtype=np.float64)
        out["from_cache"] = np.zeros((ids.shape[0],), dtype=np.int8)
        if self.stats is not None:
            first = batch.get("sample_index")
            self.stats.add.remote(self.replica_id, int(ids.shape[0]),
                                  int(np.asarray(batch["length"]).sum()),
                                  time.perf_counter() - started, self.pass_id,
                                  int(first[0]) if first is not None and len(first) else None)
        return {**batch, **out}


def label_logits(logits: Any, labels: LabelConfig, vocab_size: int,
                 sample_ids: Any = None) -> dict[str, np.ndarray]:
    """Full logits (B, L, V) -> encoded top-k soft labels (see raykd.data.soft_labels).
    sample_ids (B,) seed the tail samples, when the job draws them."""
    import torch

    k = min(labels.top_k, logits.shape[-1])
    top_logits, top_ids = torch.topk(logits, k, dim=-1, sorted=True)
    # One tempered copy for both (a pass over (B, L, V) each); none at T = 1.
    z = logits if labels.temperature == 1.0 else logits / labels.temperature
    lse = torch.logsumexp(z, dim=-1)
    m = soft_labels.tail_samples_for(labels, logits.shape[-1])
    tail = None
    if m:
        if sample_ids is None:
            raise ValueError("tail samples are seeded by the rows' sample ids; none given")
        tail = soft_labels.sample_tail(z, top_ids, m,
                                       np.asarray(sample_ids))
    return soft_labels.encode(top_ids, top_logits, lse, labels, vocab_size, tail)


def next_token_nll(logits: Any, ids: Any) -> Any:
    """-log p(ids[t+1] | ids[:t+1]) at T = 1; the last position gets 0. (B, L) float32."""
    import torch

    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    return torch.nn.functional.pad(nll, (0, 1))
