"""The soft-label cache: lineage, atomic shards, reuse without a teacher, partial recovery."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from raykd.data.label_cache import LabelCache, Lineage, file_fingerprint, model_fingerprint
from raykd.data.samples import SampleSet
from raykd.errors import ConfigError

LINEAGE = Lineage(teacher="t", tokenizer="tok", dataset="d", seq_len=8, top_k=4,
                  temperature=1.0, encoding="compact", dtype="float32", vocab_limit=None)


def rows(ids, seq_len=8, k=4):
    n = len(ids)
    return {"sample_id": np.asarray(ids, np.int64) * 7919,
            "sample_index": np.asarray(ids, np.int64),
            "input_ids": np.arange(n * seq_len, dtype=np.int32).reshape(n, seq_len),
            "length": np.full(n, seq_len, np.int32),
            "topk_q": np.full((n, seq_len, k), 7, np.uint8),
            "topk_id_planes": np.ones((n, seq_len, 2, k), np.uint8)}


def test_shards_round_trip_and_index_dedups(tmp_path):
    cache = LabelCache(str(tmp_path / "c"), LINEAGE).open()
    a = cache.write_shard(rows([5, 3, 9]))
    cache.write_shard(rows([9, 11]))  # 9 again, as after a retried teacher batch
    (tmp_path / "c" / "shards" / ".part-x.parquet.1234.tmp").write_bytes(b"half written")
    index = cache.index()
    assert len(index.paths) == 2 and index.rows() == 5
    assert index.cached(50).indices().tolist() == [3, 5, 9, 11]
    back = cache.read_shard(str(tmp_path / "c" / "shards" / a))
    assert back["sample_index"].tolist() == [5, 3, 9]
    some = cache.read_shard(str(tmp_path / "c" / "shards" / a), SampleSet.of(50, [9, 5, 42]))
    assert some["sample_index"].tolist() == [5, 9]
    assert back["topk_id_planes"].shape == (3, 8, 2, 4) and back["topk_q"].dtype == np.uint8
    assert np.array_equal(back["input_ids"], rows([5, 3, 9])["input_ids"])


def test_the_first_epoch_labels_only_what_the_cache_and_the_checkpoint_lack(tmp_path):
    """first_epoch_rows: what a (re)start reads from the cache and what it sends through
    the teacher (the count the workers wait for before taking the teacher's CPUs)."""
    from raykd.config import job_from_dict
    from raykd.data.samples import Layout
    from raykd.pipeline import DataPlan, first_epoch_rows

    job = job_from_dict({"data": {"source": str(tmp_path)}, "teacher": {"model": "t"}})
    cache = LabelCache(str(tmp_path / "c"), LINEAGE).open()
    cache.write_shard(rows([1, 2, 3]))
    train = SampleSet.of(10, np.array([0, 1, 2, 3, 4, 5]))
    plan = DataPlan(None, None, Layout(np.array([10])), train, {}, cache, SampleSet(10), False,
                    None)

    def sets(r):
        return [x.indices().tolist() for x in (r.todo, r.from_cache, r.to_label)]

    assert sets(first_epoch_rows(job, plan)) == [[0, 1, 2, 3, 4, 5], [1, 2, 3], [0, 4, 5]]
    done = SampleSet.of(10, np.array([0, 1]))  # a checkpoint's ledger
    assert sets(first_epoch_rows(job, plan, done)) == [[2, 3, 4, 5], [2, 3], [4, 5]]
    cache.write_shard(rows([4]))  # written through before the restart: found now
    assert sets(first_epoch_rows(job, plan, done)) == [[2, 3, 4, 5], [2, 3, 4], [5]]
    plan.cache = None
    assert sets(first_epoch_rows(job, plan, done)) == [[2, 3, 4, 5], [], [2, 3, 4, 5]]
    job.teacher.colocated = True
    assert sets(first_epoch_rows(job, plan, done)) == [[2, 3, 4, 5], [], []]


def test_lineage_mismatch_names_the_field(tmp_path):
    LabelCache(str(tmp_path), LINEAGE).open()
    other = dataclasses.replace(LINEAGE, top_k=8)
    with pytest.raises(ConfigError, match=r"labels.cache: .*different top_k \(4, this job: 8\)"):
        LabelCache(str(tmp_path), other).open()


def test_a_foreign_shard_is_refused(tmp_path):
    LabelCache(str(tmp_path), dataclasses.replace(LINEAGE, teacher="x")).open().write_shard(
        rows([1]))
    (tmp_path / "lineage.json").write_text(LINEAGE.to_json())  # a lying lineage.json
    with pytest.raises(ConfigError, match="different teacher"):
        LabelCache(str(tmp_path), LINEAGE).open().index()


def test_fingerprints_follow_content(tmp_path, tiny_teacher):
    import pyarrow.fs as pafs

    f = tmp_path / "a.txt"
    f.write_text("to be or not to be")
    fs = pafs.LocalFileSystem()
    before = file_fingerprint(fs, str(f))
    f.write_text("to be or not to bee")
    assert file_fingerprint(fs, str(f)) != before
    assert model_fingerprint(str(tiny_teacher)) == model_fingerprint(str(tiny_teacher))


# --------------------------------------------------------------------------- with Ray


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def teacher_actors() -> int:
    """TeacherReplica actors ever created in this Ray session (alive or dead)."""
    from ray._private import state

    return sum("TeacherReplica" in a.get("ActorClassName", "") for a in state.actors().values())


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    from tests.tiny import make_llama

    return make_llama(tmp_path_factory.mktemp("cache") / "teacher")


def job_dict(teacher: Path, out: Path, name: str, **labels) -> dict:
    from tests.test_pipeline import PLAYS
    from tests.tiny import shakespeare

    return {
        "run": {"name": name, "output_dir": str(out)},
        "data": {"source": [shakespeare(p) for p in PLAYS], "seq_len": 64,
                 "eval_fraction": 0.05, "eval_max_samples": 8},
        "teacher": {"model": str(teacher), "batch_size": 8},
        "labels": {"top_k": 8, **labels},
        "student": {"num_layers": 1, "hidden_size": 32, "num_attention_heads": 2,
                    "num_key_value_heads": 1, "intermediate_size": 64},
        "train": {"batch_size": 8, "micro_batch_size": 8, "log_every": 5, "lr": 3e-3},
    }


@pytest.mark.ray
def test_label_once_train_many(ray_cluster, teacher_dir, tmp_path):
    from raykd.config import job_from_dict
    from raykd.run_dir import read_metrics
    from raykd.runner import label_only, run

    # Run 1, two epochs, empty cache: the teacher labels epoch 1 and writes it through;
    # epoch 2 reads the cache. Teacher pools: one for the held-out set, one for epoch 1.
    first = job_from_dict({**job_dict(teacher_dir, tmp_path, "one"),
                           "train": {**job_dict(teacher_dir, tmp_path, "one")["train"],
                                     "epochs": 2}})
    before = teacher_actors()
    s1 = run(first, log=lambda _: None).summary
    assert s1["status"] == "succeeded" and s1["cached_at_start"] == 0
    assert teacher_actors() - before == 2
    assert s1["samples_per_epoch"] == [s1["train_sequences"]] * 2 and s1["samples_repeated"] == 0
    cache_dir = Path(s1["label_cache"])
    assert (cache_dir / "lineage.json").exists() and list((cache_dir / "eval").iterdir())

    # Run 2, same lineage: everything from the cache, no teacher replica at all.
    before = teacher_actors()
    s2 = run(job_from_dict(job_dict(teacher_dir, tmp_path, "two")), log=lambda _: None).summary
    assert s2["status"] == "succeeded"
    assert teacher_actors() == before
    assert s2["label_cache"] == s1["label_cache"]
    assert s2["cached_at_start"] == s2["samples_unique"] == s2["train_sequences"]
    assert s2["teacher_eval_ppl"] == pytest.approx(s1["teacher_eval_ppl"])
    labelled = max(r["labeled_at_max"] for r in read_metrics(tmp_path / "two" / "metrics.jsonl"))
    assert labelled < (tmp_path / "two" / "job.yaml").stat().st_mtime  # old labels only

    # A cache half lost (a crash, a pruned bucket): `raykd label` relabels only what is gone.
    shards = sorted((cache_dir / "shards").glob("part-*.parquet"))
    for p in shards[::2]:
        p.unlink()
    (cache_dir / "shards" / ".part-dead.parquet.0.tmp").write_bytes(b"torn")
    out = label_only(job_from_dict(job_dict(teacher_dir, tmp_path, "relabel")), log=lambda _: None)
    assert out["status"] == "succeeded"
    assert 0 < out["labelled_now"] < out["train_sequences"]
    assert out["cached_before"] + out["labelled_now"] == out["train_sequences"]
    assert (cache_dir / "manifest.json").exists()
    index = LabelCache(str(cache_dir), Lineage.from_json((cache_dir / "lineage.json").read_text())
                       ).index()
    assert len(index.cached(10**6)) >= out["train_sequences"]

    # The same cache directory asked for with other label settings is refused, before
    # a run directory exists.
    bad = job_from_dict(job_dict(teacher_dir, tmp_path, "bad", top_k=4, cache=str(cache_dir)))
    with pytest.raises(ConfigError, match="different top_k"):
        run(bad, log=lambda _: None)
    assert not (tmp_path / "bad").exists()
