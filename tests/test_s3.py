"""Data read from, and checkpoints written to, a real S3-protocol server on 127.0.0.1."""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from raykd import storage
from raykd.errors import UserError
from raykd.student.ledger import Ledger
from tests import s3
from tests.tiny import make_llama, shakespeare


@pytest.fixture(scope="module")
def s3_server():
    server, handle = s3.start()
    fs = server.filesystem()
    fs.create_dir("data")
    text = Path(shakespeare("sonnets")).read_text(errors="replace")
    sonnets = [t for t in text.split("\n\n") if len(t) > 200]
    for i in range(2):
        buf = io.BytesIO()
        pq.write_table(pa.table({"text": sonnets[i::2]}), buf)
        with fs.open_output_stream(f"data/corpus/part-{i}.parquet") as f:
            f.write(buf.getvalue())
    with fs.open_output_stream("data/corpus/notes.md") as f:
        f.write(b"not matched by the pattern")
    fs.create_dir("ckpt")
    yield server
    handle.stop()


def test_expand_lists_s3_globs(s3_server):
    files = storage.expand([s3_server.uri("data/corpus/*.parquet")], "data.source")
    assert files.paths == ["data/corpus/part-0.parquet", "data/corpus/part-1.parquet"]
    assert files.names == ["part-0.parquet", "part-1.parquet"]
    with pytest.raises(UserError, match="data.source: no files match"):
        storage.expand([s3_server.uri("data/corpus/*.jsonl")], "data.source")
    with pytest.raises(UserError, match="data.source: (no files match|cannot list)"):
        storage.expand([s3_server.uri("no-such-bucket/x/*.parquet")], "data.source")


@pytest.mark.ray
def test_distill_from_and_to_s3(s3_server, tmp_path):
    import ray

    from raykd.config import job_from_dict
    from raykd.runner import run

    teacher = make_llama(tmp_path / "teacher")
    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False)
    try:
        job = job_from_dict({
            "run": {"name": "s3run", "output_dir": str(tmp_path / "runs")},
            "data": {"source": s3_server.uri("data/corpus/*.parquet"), "seq_len": 64,
                     "eval_fraction": 0.1, "eval_max_samples": 8},
            "teacher": {"model": str(teacher), "batch_size": 4},
            "labels": {"top_k": 8},
            "student": {"num_layers": 1},
            "train": {"batch_size": 4, "micro_batch_size": 4, "max_steps": 4, "log_every": 2,
                      "checkpoint_every": 2, "storage": s3_server.uri("ckpt/runs")},
        })
        s = run(job, log=lambda _: None).summary
    finally:
        ray.shutdown()
    assert s["status"] == "succeeded" and s["steps"] == 4
    assert s["checkpoint"].startswith("ckpt/runs/s3run/checkpoint_")
    fs = s3_server.filesystem()
    listing = [i.path for i in fs.get_file_info(pafs.FileSelector(s["checkpoint"], recursive=True))]
    assert any(p.endswith("/progress.json") for p in listing)
    assert any(p.endswith("mp_rank_00_model_states.pt") for p in listing)
    with fs.open_input_file(f"{s['checkpoint']}/ledger.npz") as f:
        ledger = Ledger.from_bytes(f.read())
    assert len(ledger.samples[0]) == ledger.rows[0] == 16
    assert (tmp_path / "runs" / "s3run" / "student" / "config.json").exists()
