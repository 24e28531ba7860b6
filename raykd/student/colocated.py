"""A teacher inside the student's step (`teacher.colocated: true`).

The way TRL's GKD / distillation trainers and torchdistill work: every train worker holds
its own copy of the teacher and runs its forward on each micro-batch just before the
student's. Nothing is streamed or cached, and teacher and student cannot scale apart;
raykd offers it as the baseline its pool is measured against (bench/speed.py), and for
teachers small enough to share a worker.

The labels are those of the pool's exact encoding (top-k at T, the full-vocabulary
log-sum-exp, the tail mass), or the teacher's whole distribution when labels.top_k equals
the vocabulary (then the loss is the dense KL).
"""

from __future__ import annotations

from typing import Any

import torch

from raykd.data.soft_labels import SoftLabels, sample_tail, tail_samples_for
from raykd.student.losses import tail_log_mass


class ColocatedTeacher:
    def __init__(self, job: Any, vocab_limit: int | None, device: torch.device):
        from raykd.teacher.loading import load_model, materialize
        from raykd.teacher.replica import resolve_dtype

        self.model = load_model(materialize(job.teacher.model), resolve_dtype(job.teacher),
                                str(device))
        self.model.eval()
        self.model.requires_grad_(False)
        self.vocab = vocab_limit or self.model.config.vocab_size
        self.top_k = job.labels.top_k
        self.temperature = job.labels.temperature
        self.tail_samples = tail_samples_for(job.labels, self.vocab)

    def __call__(self, input_ids: torch.Tensor, sample_ids: torch.Tensor) -> SoftLabels:
        with torch.no_grad():
            logits = self.model(input_ids=input_ids.long()).logits[..., : self.vocab].float()
            z = logits / self.temperature
            if self.top_k >= self.vocab:
                return SoftLabels(None, torch.log_softmax(z, dim=-1))
            top, ids = torch.topk(z, self.top_k, dim=-1, sorted=True)
            log_p = top - torch.logsumexp(z, dim=-1, keepdim=True)
            labels = SoftLabels(ids, log_p, tail_log_mass(log_p))
            if self.tail_samples:  # the pool's draws for the same sample and logits
                labels.tail_ids, labels.tail_entropy = sample_tail(
                    z, ids, self.tail_samples, sample_ids.cpu())
            return labels
