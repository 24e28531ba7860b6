"""The soft-label columns: the one interface between the teacher half and the student half.

Per token position the teacher emits its top-k token ids, their raw logits, and the
log-sum-exp of logits / T over the *full* vocabulary (T = `labels.temperature`). With
those three the student side recovers exact tempered teacher probabilities for the top-k,
p_i = exp(z_i / T - lse), and the tail mass outside them, 1 - sum_i p_i.

Columns (B = rows in a batch, L = seq_len, k = top_k):

    sample_id    int64       (B,)       stable id of the packed sequence
    input_ids    int32       (B, L)     tokens, right-padded
    length       int32       (B,)       real tokens in the row
    topk_ids     int32       (B, L, k)  teacher's top-k token ids, by descending logit
    topk_logits  float32     (B, L, k)  their raw logits
    lse          float32     (B, L)     logsumexp(logits / T) over the full vocabulary
    labeled_at   float64     (B,)       unix time the teacher produced the row
    teacher_nll  float32     (B, L)     teacher's -log p(next token), T = 1; eval rows only

Ray Data carries (B, L, k) numpy arrays as tensor columns and `iter_torch_batches` hands
them back as tensors of the same shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from raykd.errors import ConfigError
from raykd.fields import doc

SEQUENCE_COLUMNS = ("sample_id", "input_ids", "length")
LABEL_COLUMNS = ("topk_ids", "topk_logits", "lse", "labeled_at")
EVAL_COLUMNS = ("teacher_nll",)


@dataclass
class LabelConfig:
    """What the teacher emits per token."""

    top_k: int = doc(64, "Teacher token ids (and logits) kept per position.")
    temperature: float = doc(
        1.0, "Softmax temperature T of the distillation term; lse is stored at this T."
    )
    encoding: Literal["exact"] = doc("exact", "Column encoding: exact = int32 ids, fp32 values.")

    def validate(self) -> None:
        if self.top_k < 1:
            raise ConfigError("top_k", f"must be >= 1, got {self.top_k}")
        if self.temperature <= 0:
            raise ConfigError("temperature", f"must be > 0, got {self.temperature}")


@dataclass
class SoftLabels:
    """Decoded soft labels as torch tensors, shapes as in the module docstring."""

    topk_ids: "torch.Tensor"  # (B, L, k) int64
    topk_logits: "torch.Tensor"  # (B, L, k) float32
    lse: "torch.Tensor"  # (B, L) float32


def encode(topk_ids: "torch.Tensor", topk_logits: "torch.Tensor", lse: "torch.Tensor",
           config: LabelConfig) -> dict[str, np.ndarray]:
    """Teacher output -> Arrow-ready numpy columns in the job's encoding."""
    if config.encoding != "exact":  # the closed set is checked by the config loader
        raise ValueError(f"unknown soft-label encoding {config.encoding!r}")
    return {
        "topk_ids": topk_ids.to(dtype=_torch().int32).cpu().numpy(),
        "topk_logits": topk_logits.float().cpu().numpy(),
        "lse": lse.float().cpu().numpy(),
    }


def decode(batch: dict[str, "torch.Tensor"], device: "torch.device | None" = None) -> SoftLabels:
    """Columns of a training batch -> SoftLabels on `device`."""
    torch = _torch()
    return SoftLabels(
        topk_ids=batch["topk_ids"].to(device=device, dtype=torch.long),
        topk_logits=batch["topk_logits"].to(device=device, dtype=torch.float32),
        lse=batch["lse"].to(device=device, dtype=torch.float32),
    )


def _torch():
    import torch

    return torch
