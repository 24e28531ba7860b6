"""Files -> documents -> fixed-length sequences with stable ids and a stable split."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raykd.data.packing import PackFiles, PackSpec, documents, is_eval, pack, sample_id
from raykd.data.samples import SampleSet
from raykd.errors import UserError


def test_pack_concatenates_with_eos_and_pads_the_rest():
    ids, length = pack([[1, 2, 3], [4, 5]], seq_len=3, eos_id=0, pad_id=9)
    # stream: 1 2 3 0 4 5 0 -> [1 2 3] [0 4 5] [0 . .] (a 1-token piece has no target)
    assert ids.tolist() == [[1, 2, 3], [0, 4, 5]]
    assert length.tolist() == [3, 3]
    ids, length = pack([[1, 2, 3, 4]], seq_len=3, eos_id=0, pad_id=9)
    assert ids.tolist() == [[1, 2, 3], [4, 0, 9]] and length.tolist() == [3, 2]
    ids, length = pack([], seq_len=3, eos_id=0, pad_id=9)
    assert ids.shape == (0, 3)


def test_sample_ids_are_stable_distinct_and_non_negative():
    a = [sample_id("hamlet.txt", i) for i in range(1000)]
    assert a == [sample_id("hamlet.txt", i) for i in range(1000)]
    assert len(set(a) | {sample_id("lear.txt", i) for i in range(1000)}) == 2000
    assert min(a) >= 0 and max(a) < 2**63


def test_split_is_deterministic_and_close_to_the_fraction():
    ids = np.array([sample_id("f", i) for i in range(20000)], dtype=np.int64)
    held = is_eval(ids, 0.05)
    assert abs(held.mean() - 0.05) < 0.01
    assert np.array_equal(held, is_eval(ids.copy(), 0.05))
    assert not is_eval(ids, 0.0).any()


def test_documents_of_each_format():
    assert documents(b"plain text", "text", "text", "a.txt") == ["plain text"]
    jsonl = b'{"text": "one"}\n\n{"text": "two", "x": 1}\n'
    assert documents(jsonl, "jsonl", "text", "a.jsonl") == ["one", "two"]
    buf = io.BytesIO()
    pq.write_table(pa.table({"body": ["x", None, "y"]}), buf)
    assert documents(buf.getvalue(), "parquet", "body", "a.parquet") == ["x", "y"]


@pytest.mark.parametrize("data, fmt, words", [
    (b'{"text": "ok"}\nnot json\n', "jsonl", "a: line 2 is not JSON"),
    (b'{"body": "x"}\n', "jsonl", "a: line 1 has no 'text' field"),
    (b"not parquet", "parquet", "a: cannot read column 'text'"),
])
def test_bad_files_name_the_file_and_line(data, fmt, words):
    with pytest.raises(UserError, match=words):
        documents(data, fmt, "text", "a")


def spec(teacher, paths, seq_len=16, eval_fraction=0.2):
    return PackSpec(teacher_model=str(teacher), names={p: p.rsplit("/", 1)[-1] for p in paths},
                    file_index={p: i for i, p in enumerate(paths)}, fmt="auto", text_key="text",
                    seq_len=seq_len, eval_fraction=eval_fraction)


def test_pack_files_numbers_and_splits_every_sequence(tiny_teacher):
    text = ("Shall I compare thee to a summer's day? " * 200).encode()
    paths = ["/d/a.txt", "/d/b.txt"]
    rows = {"bytes": np.array([text, text], dtype=object), "path": np.array(paths)}
    s = spec(tiny_teacher, paths)
    stats = PackFiles(s, "stats")(rows)
    assert stats["file_idx"].tolist() == [0, 1] and stats["count"][0] == stats["count"][1] > 10
    offsets = np.array([0, stats["count"][0]])
    train = PackFiles(s, "train", offsets)(rows)
    held = PackFiles(s, "eval", offsets)(rows)
    assert train["input_ids"].shape[1] == 16 and train["input_ids"].dtype == np.int32
    every = np.sort(np.concatenate([train["sample_index"], held["sample_index"]]))
    assert every.tolist() == list(range(int(stats["count"].sum())))  # each once
    assert set(train["sample_id"]).isdisjoint(held["sample_id"])
    assert 0 < len(held["sample_id"]) < len(every) / 2
    bits = np.unpackbits(np.frombuffer(stats["eval_bits"][0], np.uint8), count=stats["count"][0])
    assert sorted(held["sample_index"][held["sample_index"] < offsets[1]]) == \
        np.nonzero(bits)[0].tolist()
    # Deterministic, and `keep` narrows to a subset before anything else happens.
    assert np.array_equal(train["sample_id"], PackFiles(s, "train", offsets)(rows)["sample_id"])
    few = SampleSet.of(len(every), train["sample_index"][:3])
    assert PackFiles(s, "train", offsets, few)(rows)["sample_index"].tolist() == \
        train["sample_index"][:3].tolist()


def test_jsonl_rows_become_documents(tmp_path, tiny_teacher):
    data = "\n".join(json.dumps({"text": f"line {i} of the data"}) for i in range(40)).encode()
    rows = {"bytes": np.array([data], dtype=object), "path": np.array(["x.jsonl"])}
    out = PackFiles(spec(tiny_teacher, ["x.jsonl"], 8, 0.0), "train", np.array([0]))(rows)
    eos = 2
    assert (out["input_ids"] == eos).sum() >= 39  # documents are joined by EOS
