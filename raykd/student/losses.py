"""Distillation losses over sparse (top-k + tail) teacher labels. Pure functions.

The teacher's tempered distribution p is known exactly on its top-k ids and, through the
stored full-vocabulary log-sum-exp, as one number outside them: the tail mass
p_tail = 1 - sum_i p_i. The student's distribution q is coarsened the same way (its exact
probabilities on the teacher's top-k ids and its exact remaining mass q_tail), and the loss
is the KL divergence between these two (k+1)-outcome distributions:

    forward:  sum_i p_i log(p_i / q_i) + p_tail log(p_tail / q_tail)
    reverse:  sum_i q_i log(q_i / p_i) + q_tail log(q_tail / p_tail)

It equals the full-vocabulary KL when the top-k hold all the teacher's mass, and is a
lower bound otherwise (KL cannot grow when outcomes are merged). Unlike dropping the tail
(what most top-k distillers do), it still tells the student how much mass belongs outside
the top-k, so the student is not pushed to pile all its mass onto k tokens.

With tail samples (`labels.tail_samples`), the forward KL is made whole by its chain rule,

    KL(p || q) = [the (k+1)-outcome KL above] + p_tail KL(p~ || q~),

p~ and q~ being the two distributions renormalised over the ids outside the top-k. The
last term is p_tail (H(p~, q~) - H(p~)): the teacher stores H(p~) and m ids drawn from p~,
and -mean log q~(drawn) estimates the cross-entropy H(p~, q~) without bias. So the loss,
and its gradient, are unbiased estimates of the full-vocabulary forward KL's; the student
learns the teacher's shape of the tail instead of keeping its own. (Reverse KL's tail
would need the teacher's probabilities where the student puts its mass; not supported.)

All maths is in fp32 whatever the model's dtype. Tail masses are floored at
`TAIL_FLOOR`, where fp32 cannot tell 1 - sum from 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

TAIL_FLOOR = 1e-6
_LOG_TAIL_CAP = math.log1p(-TAIL_FLOOR)  # log of the largest top-k mass we resolve


@dataclass
class LossParts:
    loss: torch.Tensor  # scalar, what backward() is called on
    kd: torch.Tensor  # scalar, the KL term before alpha * T^2
    ce: torch.Tensor  # scalar, next-token cross-entropy
    tokens: torch.Tensor  # scalar, positions that counted


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends (Maechler 2012)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def tail_log_mass(log_p: torch.Tensor) -> torch.Tensor:
    """log(1 - sum_i p_i) from top-k log-probabilities (..., k), floored at TAIL_FLOOR."""
    return log1mexp(torch.logsumexp(log_p.float(), -1).clamp(max=_LOG_TAIL_CAP))


def sparse_kl(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    teacher_log_p: torch.Tensor,
    temperature: float,
    kind: str = "forward_kl",
    teacher_log_tail: torch.Tensor | None = None,
    tail_ids: torch.Tensor | None = None,
    tail_entropy: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-position KL between teacher and student, both coarsened to top-k + tail.

    student_logits (B, L, V) any float dtype; topk_ids (B, L, k) int64; teacher_log_p
    (B, L, k) the teacher's tempered log-probabilities z_i / T - logsumexp(z / T), the
    log-sum-exp taken over its full vocabulary (`soft_labels.decode` gives them);
    teacher_log_tail (B, L) the log of its mass outside the top-k, when stored (else
    derived from teacher_log_p). With tail_ids (B, L, m), ids drawn from the teacher's
    distribution outside the top-k, and tail_entropy (B, L) that distribution's entropy,
    the estimated within-tail term is added (forward KL only). Returns (B, L) float32.
    """
    s = student_logits.float() / temperature
    s_lse = torch.logsumexp(s, dim=-1, keepdim=True)  # (B, L, 1)
    log_q = s.gather(-1, topk_ids) - s_lse  # (B, L, k)
    log_p = teacher_log_p.float()
    log_p_tail = tail_log_mass(log_p) if teacher_log_tail is None else teacher_log_tail.float()
    log_q_tail = tail_log_mass(log_q)  # (B, L)
    if kind == "forward_kl":
        body = (log_p.exp() * (log_p - log_q)).sum(-1)
        tail = log_p_tail.exp() * (log_p_tail - log_q_tail)
        if tail_ids is not None:
            log_q_drawn = s.gather(-1, tail_ids) - s_lse - log_q_tail.unsqueeze(-1)  # log q~
            cross = -log_q_drawn.mean(-1)  # estimates H(p~, q~)
            tail = tail + log_p_tail.exp() * (cross - tail_entropy.float())
    elif tail_ids is not None:
        raise ValueError("tail samples estimate the forward KL only")
    elif kind == "reverse_kl":
        body = (log_q.exp() * (log_q - log_p)).sum(-1)
        tail = log_q_tail.exp() * (log_q_tail - log_p_tail)
    else:
        raise ValueError(f"unknown KL kind {kind!r}")
    return body + tail


def dense_kl(student_logits: torch.Tensor, teacher_log_p: torch.Tensor, temperature: float,
             kind: str = "forward_kl") -> torch.Tensor:
    """Per-position KL over the full vocabulary: teacher_log_p (B, L, V) is
    log softmax(z / T) of the teacher (a co-located teacher with labels.top_k = V).
    Returns (B, L) float32."""
    log_q = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = teacher_log_p.float()
    if kind == "forward_kl":
        return (log_p.exp() * (log_p - log_q)).sum(-1)
    if kind == "reverse_kl":
        return (log_q.exp() * (log_q - log_p)).sum(-1)
    raise ValueError(f"unknown KL kind {kind!r}")


def target_mask(length: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(B, L) bool: positions t with a real next token (t + 1 < length)."""
    positions = torch.arange(seq_len, device=length.device)
    return positions.unsqueeze(0) + 1 < length.unsqueeze(1)


def row_losses(
    logits: torch.Tensor,
    targets: torch.Tensor,
    topk_ids: torch.Tensor | None,
    teacher_log_p: torch.Tensor | None,
    temperature: float,
    kind: str = "forward_kl",
    teacher_log_tail: torch.Tensor | None = None,
    tail_ids: torch.Tensor | None = None,
    tail_entropy: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(KL, CE) per position: logits (..., V); targets (...) the next token ids; the
    teacher's labels as in `sparse_kl` (topk_ids None: `dense_kl`; teacher_log_p None: no
    KD term, zeros). Both float32 of shape (...)."""
    x = logits.float()
    ce = torch.logsumexp(x, dim=-1) - x.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    if teacher_log_p is None:
        return torch.zeros_like(ce), ce
    kd = (dense_kl(x, teacher_log_p, temperature, kind) if topk_ids is None else
          sparse_kl(x, topk_ids, teacher_log_p, temperature, kind, teacher_log_tail,
                    tail_ids, tail_entropy))
    return kd, ce


def distill_loss(
    student_logits: torch.Tensor,
    input_ids: torch.Tensor,
    length: torch.Tensor,
    topk_ids: torch.Tensor | None,
    teacher_log_p: torch.Tensor,
    *,
    alpha: float,
    temperature: float,
    kind: str = "forward_kl",
    teacher_log_tail: torch.Tensor | None = None,
    with_kd: bool | None = None,
    tail_ids: torch.Tensor | None = None,
    tail_entropy: torch.Tensor | None = None,
) -> LossParts:
    """alpha * T^2 * KL + (1 - alpha) * CE, averaged over positions with a next token.

    Shapes as in `sparse_kl` (and tail_ids, tail_entropy: its tail samples, or None;
    topk_ids None: teacher_log_p is over the full vocabulary,
    see `dense_kl`); input_ids (B, L); length (B,). Padding and the last real
    position (no target) are masked out of both terms, so a batch of length-0 rows is a
    zero loss that still runs forward/backward (how ranks that ran out of data keep
    DeepSpeed's collectives in step). with_kd: compute the KL term (default: when
    alpha > 0; evaluation reports it regardless).
    """
    mask = target_mask(length, input_ids.shape[1]).float()
    tokens = mask.sum()
    denom = tokens.clamp(min=1.0)
    with_kd = alpha > 0 if with_kd is None else with_kd
    targets = torch.nn.functional.pad(input_ids[:, 1:], (0, 1))
    kd, ce = row_losses(student_logits, targets, topk_ids, teacher_log_p if with_kd else None,
                        temperature, kind, teacher_log_tail, tail_ids, tail_entropy)
    kd = (kd * mask).sum() / denom
    ce = (ce * mask).sum() / denom
    loss = alpha * temperature**2 * kd + (1.0 - alpha) * ce
    return LossParts(loss=loss, kd=kd.detach(), ce=ce.detach(), tokens=tokens)
