"""Tail samples (`labels.tail_samples`): ids drawn from the teacher's distribution outside
the top-k. They follow that distribution, depend only on the sample, survive every
encoding, and make the sparse loss an unbiased estimate of the full-vocabulary KL."""

from __future__ import annotations

import json

import pytest
import torch

from raykd.data import soft_labels
from raykd.data.label_cache import Lineage
from raykd.data.soft_labels import ENCODINGS, LabelConfig, SoftLabels, sample_tail
from raykd.student.head_loss import chunked_distill_loss
from raykd.student.losses import dense_kl, distill_loss, sparse_kl, tail_log_mass
from raykd.teacher.replica import label_logits
from tests.test_soft_labels import _through_parquet


def _logits(B=2, L=3, V=40, seed=0):
    return torch.randn(B, L, V, generator=torch.Generator().manual_seed(seed)) * 2


def test_draws_follow_the_teacher_outside_the_top_k():
    z = _logits()
    top = z.topk(5, -1).indices
    ids, entropy = sample_tail(z, top, 40_000, torch.tensor([3, 4]))
    assert ids.shape == (2, 3, 40_000)
    tail_z = z.scatter(-1, top, float("-inf"))
    p_tilde = torch.softmax(tail_z, -1)
    counts = torch.zeros_like(p_tilde).scatter_add_(-1, ids, torch.ones_like(ids, dtype=z.dtype))
    assert torch.all(counts.gather(-1, top) == 0)  # never a top-k id
    torch.testing.assert_close(counts / 40_000, p_tilde, atol=0.01, rtol=0)
    want = -(p_tilde * torch.log_softmax(tail_z, -1).nan_to_num(neginf=0.0)).sum(-1)
    torch.testing.assert_close(entropy, want)


def test_masked_logits_are_never_drawn_and_keep_the_entropy_finite():
    z = _logits()
    top = z.topk(5, -1).indices
    masked = torch.zeros_like(z, dtype=torch.bool)
    masked[..., -7:] = True  # e.g. a padded vocabulary's logits set to -inf
    masked.scatter_(-1, top, False)
    z = z.masked_fill(masked, float("-inf"))
    ids, entropy = sample_tail(z, top, 2_000, torch.tensor([1, 2]))
    assert not masked.gather(-1, ids).any()
    tail_z = z.scatter(-1, top, float("-inf"))
    p_tilde = torch.softmax(tail_z, -1)
    want = -(p_tilde * torch.log_softmax(tail_z, -1).nan_to_num(neginf=0.0)).sum(-1)
    torch.testing.assert_close(entropy, want)


def test_draws_depend_only_on_the_sample_and_its_logits():
    z = _logits(B=3)
    top = z.topk(5, -1).indices
    ids, _ = sample_tail(z, top, 16, torch.tensor([10, 11, 12]))
    # Row 1 again, alone and in another batch position: the same draws.
    alone, _ = sample_tail(z[1:2], top[1:2], 16, torch.tensor([11]))
    assert torch.equal(alone[0], ids[1])
    moved, _ = sample_tail(z[[2, 1]], top[[2, 1]], 16, torch.tensor([12, 11]))
    assert torch.equal(moved[1], ids[1]) and torch.equal(moved[0], ids[2])
    other, _ = sample_tail(z[1:2], top[1:2], 16, torch.tensor([99]))
    assert not torch.equal(other[0], ids[1])


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_tail_columns_survive_every_encoding(encoding):
    z = _logits(V=300) * 2
    cfg = LabelConfig(top_k=4, temperature=2.0, encoding=encoding, tail_samples=6)
    sample_ids = torch.tensor([5, 6])
    cols = label_logits(z, cfg, 300, sample_ids)
    labels = soft_labels.decode(_through_parquet(cols), 2.0)
    top = (z / 2.0).topk(4, -1).indices
    want_ids, want_entropy = sample_tail(z / 2.0, top, 6, sample_ids)
    # The draws' order is not kept (compact sorts them): compare them as multisets.
    assert torch.equal(labels.tail_ids.sort(-1).values, want_ids.sort(-1).values)
    tolerance = 1e-6 if encoding == "exact" else 2e-3
    torch.testing.assert_close(labels.tail_entropy, want_entropy, rtol=tolerance, atol=1e-6)
    empty = soft_labels.empty_label_columns(encoding, 2, 3, 4, 300, tail_samples=6)
    assert {k: (v.shape, v.dtype) for k, v in cols.items()} == \
           {k: (v.shape, v.dtype) for k, v in empty.items()}
    # Without tail samples, no tail columns and no seeds needed.
    plain = label_logits(z, LabelConfig(top_k=4, encoding=encoding), 300)
    assert soft_labels.decode(_through_parquet(plain), 1.0).tail_ids is None


def test_no_draws_when_the_top_k_hold_the_whole_vocabulary():
    cols = label_logits(_logits(V=6), LabelConfig(top_k=6, encoding="exact", tail_samples=4), 6)
    assert "tail_ids" not in cols


def _teacher_and_draws(m: int, T: float = 2.0, V: int = 50, k: int = 6):
    z = _logits(V=V, seed=1) * 1.5
    zt = z / T
    top_logits, top = zt.topk(k, -1)
    log_p = top_logits - torch.logsumexp(zt, -1, keepdim=True)
    ids, entropy = sample_tail(zt, top, m, torch.tensor([0, 1]))
    return zt, top, log_p, ids, entropy


def test_the_loss_estimates_the_full_vocabulary_kl_and_its_gradient():
    T = 2.0
    zt, top, log_p, ids, entropy = _teacher_and_draws(m=100_000, T=T)
    student = (_logits(V=50, seed=2) * 1.2).requires_grad_()

    full = dense_kl(student, torch.log_softmax(zt, -1), T)
    (full_grad,) = torch.autograd.grad(full.sum(), student)
    bucket = sparse_kl(student, top, log_p, T)
    est = sparse_kl(student, top, log_p, T, tail_ids=ids, tail_entropy=entropy)
    (est_grad,) = torch.autograd.grad(est.sum(), student)

    assert torch.all(bucket < full - 1e-3)  # the tail outcome alone: a strict lower bound
    torch.testing.assert_close(est, full, atol=2e-3, rtol=1e-2)  # the estimate: the whole KL
    torch.testing.assert_close(est_grad, full_grad, atol=3e-3, rtol=0)
    with pytest.raises(ValueError, match="forward KL only"):
        sparse_kl(student, top, log_p, T, "reverse_kl", tail_ids=ids, tail_entropy=entropy)


def test_chunked_head_equals_full_logits_with_tail_samples():
    from tests.test_head_loss import _grads, _tiny_lm

    model = _tiny_lm()
    g = torch.Generator().manual_seed(3)
    B, L, V, T = 3, 9, 97, 2.0
    input_ids = torch.randint(0, V, (B, L), generator=g)
    length = torch.tensor([L, 4, 0])
    z = torch.randn(B, L, V, generator=g) * 3 / T
    top_z, top = z.topk(8, -1)
    log_p = top_z - torch.logsumexp(z, -1, keepdim=True)
    ids, entropy = sample_tail(z, top, 5, torch.arange(B))
    labels = SoftLabels(top, log_p, tail_log_mass(log_p), ids, entropy)

    ref = distill_loss(model(input_ids=input_ids).logits, input_ids, length, top, log_p,
                       alpha=0.5, temperature=T, teacher_log_tail=labels.log_tail,
                       tail_ids=ids, tail_entropy=entropy)
    ref.loss.backward()
    ref_grads = _grads(model)
    model.zero_grad()
    no_tail = distill_loss(model(input_ids=input_ids).logits, input_ids, length, top, log_p,
                           alpha=0.5, temperature=T, teacher_log_tail=labels.log_tail)
    assert abs(float(no_tail.kd) - float(ref.kd)) > 1e-3  # the draws do change the loss
    model.zero_grad()

    out = model(input_ids=input_ids, output_hidden_states=True,
                logits_to_keep=torch.empty(0, dtype=torch.long))
    got = chunked_distill_loss(out.hidden_states[-1], model.lm_head.weight, input_ids, length,
                               labels, alpha=0.5, temperature=T, chunk_rows=4)
    got.loss.backward()
    for name in ("loss", "kd", "ce"):
        torch.testing.assert_close(getattr(got, name).detach(), getattr(ref, name).detach(),
                                   atol=1e-5, rtol=1e-5, msg=name)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(_grads(model)[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_caches_written_before_tail_samples_keep_their_key():
    base = dict(teacher="t", tokenizer="k", dataset="d", seq_len=64, top_k=8,
                temperature=1.0, encoding="compact", dtype="float32", vocab_limit=None)
    old_json = json.dumps(base, sort_keys=True)  # what a cache's lineage.json held before
    lineage = Lineage(**base)
    assert lineage.to_json() == old_json
    assert Lineage.from_json(old_json) == lineage and lineage.tail_samples == 0
    with_draws = Lineage(**base, tail_samples=16)
    assert with_draws.key() != lineage.key()
    assert with_draws.differences(lineage) == ["tail_samples"]
    assert Lineage.from_json(with_draws.to_json()) == with_draws
