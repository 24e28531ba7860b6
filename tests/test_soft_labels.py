"""The soft-label columns survive the trip teacher -> Arrow -> student unchanged."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from raykd.data import soft_labels
from raykd.data.soft_labels import LabelConfig
from raykd.teacher.replica import label_logits, next_token_nll


def test_round_trip_through_arrow_tensor_columns():
    from ray.data.extensions import ArrowTensorArray

    torch.manual_seed(0)
    logits = torch.randn(3, 7, 100) * 4
    cfg = LabelConfig(top_k=5, temperature=2.0)
    cols = label_logits(logits, cfg)
    assert cols["topk_ids"].shape == (3, 7, 5) and cols["topk_ids"].dtype == np.int32
    assert cols["lse"].shape == (3, 7)
    table = pa.table({k: ArrowTensorArray.from_numpy(v) for k, v in cols.items()})
    back = {k: torch.from_numpy(table.column(k).chunk(0).to_numpy()) for k in cols}
    labels = soft_labels.decode(back)
    ref_logits, ref_ids = logits.topk(5, -1)
    assert torch.equal(labels.topk_ids, ref_ids)
    assert torch.equal(labels.topk_logits, ref_logits)
    torch.testing.assert_close(labels.lse, torch.logsumexp(logits / 2.0, -1))
    # Exact tempered probabilities and the tail are recoverable from the three columns.
    p = torch.softmax(logits / 2.0, -1)
    p_top = (labels.topk_logits / 2.0 - labels.lse[..., None]).exp()
    torch.testing.assert_close(p_top, p.gather(-1, ref_ids))
    torch.testing.assert_close(1 - p_top.sum(-1), 1 - p.gather(-1, ref_ids).sum(-1))


def test_top_k_is_capped_by_the_vocabulary():
    cols = label_logits(torch.randn(1, 2, 4), LabelConfig(top_k=10))
    assert cols["topk_ids"].shape == (1, 2, 4)


def test_teacher_nll_is_next_token_cross_entropy():
    logits = torch.randn(2, 5, 9)
    ids = torch.randint(0, 9, (2, 5))
    nll = next_token_nll(logits, ids)
    ref = torch.nn.functional.cross_entropy(logits[1, 3][None], ids[1, 4][None])
    torch.testing.assert_close(nll[1, 3], ref)
    assert torch.all(nll[:, -1] == 0)
