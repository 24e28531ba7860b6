"""The sparse KD loss against naive dense references, plus a golden value."""

from __future__ import annotations

import math

import pytest
import torch

from raykd.student.losses import distill_loss, sparse_kl, target_mask


def _labels(teacher_logits: torch.Tensor, k: int, T: float):
    """(top-k ids, their tempered log-probs) as soft_labels.decode returns them."""
    top_logits, top_ids = teacher_logits.topk(k, dim=-1)
    return top_ids, top_logits / T - torch.logsumexp(teacher_logits / T, -1, keepdim=True)


def _bucketed_reference(student, teacher, k, T, kind):
    """Loop-over-positions float64 KL between (top-k + one tail bucket) distributions."""
    B, L, V = teacher.shape
    out = torch.zeros(B, L, dtype=torch.float64)
    for b in range(B):
        for t in range(L):
            p = torch.softmax(teacher[b, t].double() / T, -1)
            q = torch.softmax(student[b, t].double() / T, -1)
            ids = teacher[b, t].topk(k).indices
            pb = torch.cat([p[ids], (1 - p[ids].sum()).reshape(1)])
            qb = torch.cat([q[ids], (1 - q[ids].sum()).reshape(1)])
            a, c = (pb, qb) if kind == "forward_kl" else (qb, pb)
            out[b, t] = sum(float(x * (math.log(x) - math.log(y))) for x, y in zip(a, c) if x > 0)
    return out


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl"])
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_full_vocab_equals_dense_kl(kind, T):
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 50) * 3, torch.randn(2, 5, 50) * 3
    ids, log_p = _labels(t, 50, T)
    got = sparse_kl(s, ids, log_p, T, kind)
    logp, logq = torch.log_softmax(t / T, -1), torch.log_softmax(s / T, -1)
    if kind == "forward_kl":
        dense = (logp.exp() * (logp - logq)).sum(-1)
    else:
        dense = (logq.exp() * (logq - logp)).sum(-1)
    torch.testing.assert_close(got, dense, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl"])
@pytest.mark.parametrize("k", [1, 4, 17])
def test_top_k_matches_bucketed_reference(kind, k):
    torch.manual_seed(1)
    s, t = torch.randn(2, 3, 40) * 2, torch.randn(2, 3, 40) * 4
    ids, log_p = _labels(t, k, 1.5)
    got = sparse_kl(s, ids, log_p, 1.5, kind)
    ref = _bucketed_reference(s, t, k, 1.5, kind)
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-4)


def test_top_k_never_exceeds_full_kl():
    torch.manual_seed(2)
    s, t = torch.randn(4, 8, 64), torch.randn(4, 8, 64) * 3
    full = sparse_kl(s, *_labels(t, 64, 1.0), 1.0)
    for k in (1, 8, 32):
        assert (sparse_kl(s, *_labels(t, k, 1.0), 1.0) <= full + 1e-5).all()


def test_golden_value():
    """V=3, k=1, T=1: teacher logits (2, 0, 0), student logits (0, 0, 0).

    p = (e^2, 1, 1) / (e^2 + 2); top-1 = token 0; tail = 2 / (e^2 + 2).
    q = (1/3, 1/3, 1/3); tail = 2/3.  KL = p0 ln(p0 / (1/3)) + pt ln(pt / (2/3)).
    """
    e2 = math.exp(2.0)
    p0, pt = e2 / (e2 + 2), 2 / (e2 + 2)
    expected = p0 * math.log(3 * p0) + pt * math.log(1.5 * pt)
    assert abs(expected - 0.4330396068) < 1e-9  # the formula above, evaluated once
    t = torch.tensor([[[2.0, 0.0, 0.0]]])
    got = sparse_kl(torch.zeros(1, 1, 3), *_labels(t, 1, 1.0), 1.0)
    assert abs(float(got) - expected) < 1e-6


def test_distill_loss_masks_padding_and_mixes_terms():
    torch.manual_seed(3)
    B, L, V, k = 2, 6, 30, 5
    s, t = torch.randn(B, L, V), torch.randn(B, L, V)
    input_ids = torch.randint(0, V, (B, L))
    length = torch.tensor([6, 3])
    ids, log_p = _labels(t, k, 2.0)
    parts = distill_loss(s, input_ids, length, ids, log_p, alpha=0.3, temperature=2.0)
    mask = target_mask(length, L)
    assert mask.tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0]]
    kd = sparse_kl(s, ids, log_p, 2.0)[mask].mean()
    ce = torch.nn.functional.cross_entropy(s[:, :-1].reshape(-1, V), input_ids[:, 1:].reshape(-1),
                                           reduction="none").view(B, L - 1)[mask[:, :-1]].mean()
    torch.testing.assert_close(parts.kd, kd)
    torch.testing.assert_close(parts.ce, ce)
    torch.testing.assert_close(parts.loss, 0.3 * 4.0 * kd + 0.7 * ce)
    assert float(parts.tokens) == 7
    # Changing padded positions changes nothing.
    s2 = s.clone()
    s2[1, 3:] = 100.0
    again = distill_loss(s2, input_ids, length, ids, log_p, alpha=0.3, temperature=2.0)
    torch.testing.assert_close(again.loss, parts.loss)


def test_zero_length_batch_is_a_zero_loss_with_gradients():
    s = torch.randn(1, 4, 10, requires_grad=True)
    ids, log_p = _labels(torch.randn(1, 4, 10), 3, 1.0)
    parts = distill_loss(s, torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, dtype=torch.long),
                         ids, log_p, alpha=0.5, temperature=1.0)
    parts.loss.backward()
    assert float(parts.loss.detach()) == 0.0 and float(parts.tokens) == 0.0
    assert s.grad is not None and torch.all(s.grad == 0)


def test_gradients_are_finite_when_top_k_holds_all_mass():
    t = torch.full((1, 2, 20), -1e4)
    t[..., 0] = 10.0  # one-hot teacher: tail mass underflows to 0
    s = torch.randn(1, 2, 20, requires_grad=True)
    s.data[..., 0] = 50.0  # student also one-hot: its tail underflows too
    loss = sparse_kl(s, *_labels(t, 2, 1.0), 1.0).sum()
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


def test_bf16_student_logits_are_upcast():
    torch.manual_seed(4)
    s, t = torch.randn(2, 3, 40), torch.randn(2, 3, 40)
    labels = _labels(t, 8, 1.0)
    a = sparse_kl(s, *labels, 1.0)
    b = sparse_kl(s.bfloat16(), *labels, 1.0)
    assert b.dtype == torch.float32
    torch.testing.assert_close(a, b, atol=0.05, rtol=0.05)
