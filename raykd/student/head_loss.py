"""The student's LM head and distillation loss, applied a chunk of positions at a time.

Why: the head's output is positions x vocabulary. For a micro-batch of 8 x 128 tokens and
SmolLM2's 49,152-token vocabulary that is 201 MB in fp32, and the loss makes several more
tensors that size (tempered logits, softmax, their gradients). Allocations that large are
fresh mmaps every time (glibc hands them back on free), so each step page-faults gigabytes
of zeros: on CPU the profile put 30-40 % of the student's time in the kernel
(docs/benchmarks.md). Here the model stops at its final hidden states; the head and the
loss then run on chunks of rows, each chunk's backward done at once, keeping only the
gradients for the hidden states and the head weight, so no logits tensor larger than one
chunk ever exists (the approach of Liger Kernel's fused linear cross-entropy, applied to
the sparse KD loss of `losses.py`). Positions without a target (padding, a row's last
token) are dropped before the head.

`StudentLoss` picks this path when the model's head is a plain bias-free linear map of the
final hidden states (checked once against the model's own logits) and falls back to the
full logits otherwise, and under ZeRO-3, whose partitioned head weight only exists inside
the head's own forward.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from raykd.data.soft_labels import SoftLabels
from raykd.student.losses import LossParts, distill_loss, row_losses, target_mask

log = logging.getLogger(__name__)

# Elements of one chunk's (rows x vocabulary) logits: 2^22 fp32 is 16 MiB (85 rows of
# SmolLM2's vocabulary), under glibc's 32 MiB ceiling for serving a block from its heap
# rather than a fresh mmap; 2^20 to 2^22 fault alike, the larger matmuls run faster
# (bench/head_loss.py, docs/benchmarks.md).
CHUNK_ELEMENTS = 1 << 22

ChunkLoss = Callable[[torch.Tensor, int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


class _ChunkedHead(torch.autograd.Function):
    """sum over chunks of chunk_loss(hidden[lo:hi] @ weight.T) -> (loss, kd, ce) sums.

    The forward also does the backward, chunk by chunk (the gradient of a sum splits into
    per-chunk gradients), and keeps d loss / d hidden and d loss / d weight; the backward
    only scales them. Compute is one head forward and backward, as unchunked.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, chunk_loss: ChunkLoss,
                chunk_rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        w = weight.detach()
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        sums = torch.zeros(3, dtype=torch.float32, device=hidden.device)
        for lo in range(0, hidden.shape[0], chunk_rows):
            hi = min(lo + chunk_rows, hidden.shape[0])
            h = hidden[lo:hi].detach()
            with torch.enable_grad():
                logits = (h @ w.T).requires_grad_()
                loss, kd, ce = chunk_loss(logits, lo, hi)
                (grad_logits,) = torch.autograd.grad(loss, logits)
            grad_hidden[lo:hi] = grad_logits @ w
            grad_weight.addmm_(grad_logits.T.float(), h.float())
            sums += torch.stack([loss.detach(), kd, ce])
        ctx.save_for_backward(grad_hidden, grad_weight.to(w.dtype))
        loss, kd, ce = sums.unbind()
        ctx.mark_non_differentiable(kd, ce)
        return loss, kd, ce

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, *_: Any) -> tuple[Any, ...]:
        grad_hidden, grad_weight = ctx.saved_tensors
        if bool(grad_loss == 1):  # the usual case: spare a weight-sized product
            return grad_hidden, grad_weight, None, None
        return grad_hidden * grad_loss, grad_weight * grad_loss, None, None


def chunked_distill_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    input_ids: torch.Tensor,
    length: torch.Tensor,
    labels: SoftLabels,
    *,
    alpha: float,
    temperature: float,
    kind: str = "forward_kl",
    with_kd: bool | None = None,
    chunk_rows: int | None = None,
) -> LossParts:
    """`losses.distill_loss` of the logits hidden @ weight.T, never materialised whole.

    hidden (B, L, H) the model's final hidden states; weight (V, H) its head, cut to the
    labels' vocabulary. with_kd: compute the KD term (default: when alpha > 0; evaluation
    wants it regardless). chunk_rows defaults to CHUNK_ELEMENTS / V.
    """
    B, L, H = hidden.shape
    rows = target_mask(length, L).reshape(-1).nonzero().squeeze(1)
    targets = torch.nn.functional.pad(input_ids[:, 1:], (0, 1)).reshape(-1)[rows].long()
    h = hidden.reshape(B * L, H).index_select(0, rows)
    with_kd = alpha > 0 if with_kd is None else with_kd

    def pick(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.reshape(B * L, *t.shape[2:]).index_select(0, rows)

    topk_ids, log_p, log_tail = pick(labels.topk_ids), pick(labels.log_p), pick(labels.log_tail)
    tail_ids, tail_entropy = pick(labels.tail_ids), pick(labels.tail_entropy)

    def chunk_loss(logits: torch.Tensor, lo: int, hi: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        def rows_of(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[lo:hi]

        kd, ce = row_losses(
            logits, targets[lo:hi], rows_of(topk_ids), rows_of(log_p) if with_kd else None,
            temperature, kind, rows_of(log_tail), rows_of(tail_ids), rows_of(tail_entropy))
        kd_sum, ce_sum = kd.sum(), ce.sum()
        return alpha * temperature**2 * kd_sum + (1.0 - alpha) * ce_sum, kd_sum.detach(), \
            ce_sum.detach()

    chunk_rows = chunk_rows or max(1, CHUNK_ELEMENTS // weight.shape[0])
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        loss, kd, ce = _ChunkedHead.apply(h, weight, chunk_loss, chunk_rows)
    else:  # evaluation: the same sums, no gradients
        sums = torch.zeros(3, dtype=torch.float32, device=h.device)
        for lo in range(0, h.shape[0], chunk_rows):
            hi = min(lo + chunk_rows, h.shape[0])
            sums += torch.stack(chunk_loss(h[lo:hi] @ weight.T, lo, hi))
        loss, kd, ce = sums.unbind()
    tokens = torch.tensor(float(rows.numel()), device=hidden.device)  # as distill_loss's
    denom = tokens.clamp(min=1.0)
    return LossParts(loss=loss / denom, kd=kd / denom, ce=ce / denom, tokens=tokens)


class StudentLoss:
    """The student's forward and loss on a micro-batch: `model` is the DeepSpeed engine
    (or a bare Hugging Face causal LM, as in bench/speed.py's plain loop)."""

    def __init__(self, model: Any, vocab_size: int, *, alpha: float, temperature: float,
                 kind: str = "forward_kl", chunked: bool = True):
        self.model = model
        self.vocab_size = vocab_size
        self.alpha, self.temperature, self.kind = alpha, temperature, kind
        self.chunked: bool | None = None if chunked and _plain_head(model) else False

    def __call__(self, input_ids: torch.Tensor, length: torch.Tensor, labels: SoftLabels,
                 with_kd: bool | None = None) -> LossParts:
        if self.chunked is None:  # first call: does hidden @ W.T give the model's logits?
            self.chunked = self._head_matches(input_ids[:1])
        if not self.chunked:
            logits = self.model(input_ids=input_ids.long()).logits[..., :self.vocab_size]
            return distill_loss(logits, input_ids, length, labels.topk_ids, labels.log_p,
                                alpha=self.alpha, temperature=self.temperature,
                                kind=self.kind, teacher_log_tail=labels.log_tail,
                                with_kd=with_kd, tail_ids=labels.tail_ids,
                                tail_entropy=labels.tail_entropy)
        hidden, weight = self._hidden(input_ids)
        return chunked_distill_loss(
            hidden, weight, input_ids, length, labels, alpha=self.alpha,
            temperature=self.temperature, kind=self.kind, with_kd=with_kd)

    def _hidden(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # No logits at all (an empty index to keep), the hidden states after the final norm.
        out = self.model(input_ids=input_ids.long(), output_hidden_states=True,
                         logits_to_keep=torch.empty(0, dtype=torch.long,
                                                    device=input_ids.device))
        return out.hidden_states[-1], _module(self.model).get_output_embeddings().weight[
            :self.vocab_size]

    def _head_matches(self, input_ids: torch.Tensor) -> bool:
        module = _module(self.model)
        was_training = module.training
        module.eval()  # no dropout, so the two forwards are comparable
        try:
            with torch.no_grad():
                full = self.model(input_ids=input_ids.long()).logits[..., :self.vocab_size]
                hidden, weight = self._hidden(input_ids)
                ours = hidden @ weight.T
        except (TypeError, ValueError, AttributeError) as e:
            log.warning("student head: full logits (no hidden states from the model: %s)", e)
            return False
        finally:
            module.train(was_training)
        tol = 1e-3 if full.dtype == torch.float32 else 5e-2
        same = ours.shape == full.shape and torch.allclose(ours.float(), full.float(),
                                                           atol=tol, rtol=tol)
        if not same:
            log.warning("student head: full logits (hidden @ head weight is not the model's "
                        "logits for %s)", type(module).__name__)
        return same


def _module(model: Any) -> Any:
    return getattr(model, "module", model)  # the DeepSpeed engine wraps the model


def _plain_head(model: Any) -> bool:
    head = _module(model).get_output_embeddings()
    return (isinstance(head, torch.nn.Linear) and head.bias is None
            and not hasattr(head.weight, "ds_id"))  # ZeRO-3 partitions it: full logits
