"""Job files: loading, overrides and one-line errors that name the dotted key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from raykd.config import dump_yaml, load_job
from raykd.errors import ConfigError

MINIMAL = {"data": {"source": "data/*.txt"}, "teacher": {"model": "some/model"}}


def write(tmp_path: Path, data) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def error_of(tmp_path: Path, data, overrides=()) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_job(write(tmp_path, data), list(overrides))
    return info.value


def test_defaults_and_overrides(tmp_path):
    job = load_job(write(tmp_path, MINIMAL),
                   ["train.lr=1e-3", "train.zero_stage=3", "student.init_layers=[0, 2]",
                    "student.num_layers=2", "student.init_from_teacher=true",
                    "teacher.replicas.max=3", "run.name=x"])
    assert job.train.lr == 1e-3 and isinstance(job.train.lr, float)
    assert job.train.zero_stage == 3
    assert job.student.init_layers == [0, 2]
    assert job.teacher.replicas.max == 3 and job.teacher.replicas.min == 1
    assert job.data.sources == ["data/*.txt"]
    assert job.run_dir == Path("runs/x")
    # The resolved job round-trips through job.yaml.
    again = load_job(write(tmp_path, dump_yaml(job)))
    assert again == job


@pytest.mark.parametrize("overrides, want", [
    ([], 64),  # forward KL: draws estimate the rest of the vocabulary
    (["loss.kind=reverse_kl"], 0),  # which they cannot estimate under reverse KL
    (["labels.tail_samples=0"], 0),
    (["labels.tail_samples=16"], 16),
])
def test_tail_samples_default_follows_the_loss(tmp_path, overrides, want):
    job = load_job(write(tmp_path, MINIMAL), overrides)
    assert job.labels.tail_samples == want
    # The resolved value is what a run saves and reloads.
    again = load_job(write(tmp_path, yaml.safe_load(dump_yaml(job))))
    assert again.labels.tail_samples == want


def test_grad_accumulation_is_derived(tmp_path):
    job = load_job(write(tmp_path, MINIMAL), ["train.batch_size=32", "train.micro_batch_size=4",
                                              "train.num_workers=2"])
    assert job.train.grad_accum_steps == 4


@pytest.mark.parametrize("overrides, key, words", [
    (["train.zero_stage=4"], "train.zero_stage", "must be 0-3, got 4"),
    (["train.batch_size=12", "train.num_workers=2", "train.micro_batch_size=4"],
     "train.batch_size", "not divisible"),
    (["trian.lr=1"], "trian", "did you mean 'train'"),
    (["train.lrr=1"], "train.lrr", "did you mean 'lr'"),
    (["train.lr=fast"], "train.lr", "must be a number"),
    (["train.num_workers=1.5"], "train.num_workers", "must be an integer"),
    (["train.use_gpu=maybe"], "train.use_gpu", "true or false"),
    (["loss.kind=forward"], "loss.kind", "did you mean 'forward_kl'"),
    (["loss.alpha=1.5"], "loss.alpha", "must be in [0, 1]"),
    (["labels.top_k=0"], "labels.top_k", ">= 1"),
    (["labels.tail_samples=-1"], "labels.tail_samples", ">= 0"),
    (["labels.tail_samples=8", "loss.kind=reverse_kl"], "labels.tail_samples",
     "forward KL only"),
    (["teacher.replicas.min=3", "teacher.replicas.max=2"], "teacher.replicas.max", ">="),
    (["data.seq_len=1"], "data.seq_len", ">= 2"),
    (["data.eval_fraction=1"], "data.eval_fraction", "[0, 1)"),
    (["student.num_layers=2", "student.init_layers=[0]", "student.init_from_teacher=true"],
     "student.init_layers", "has 1 entries"),
    (["student.init_from_teacher=true", "student.hidden_size=64"],
     "student.init_from_teacher", "must stay null"),
    (["train.precision=bf16"], "train.precision", "needs use_gpu"),
    (["train.betas=[0.9]"], "train.betas", "two numbers"),
    (["run.name=a/b"], "run.name", "plain directory name"),
    (["train=3"], "train", "must be a mapping"),
    (["train.lr=1", "train.lr.x=3"], "train.lr", "is a value, not a section"),
])
def test_errors_name_the_key(tmp_path, overrides, key, words):
    err = error_of(tmp_path, MINIMAL, overrides)
    assert err.key == key
    assert words in str(err)
    assert "\n" not in str(err)
    assert str(tmp_path / "job.yaml") in str(err)


def test_missing_required_section(tmp_path):
    assert error_of(tmp_path, {"data": {"source": "x"}}).key == "teacher"
    assert error_of(tmp_path, {"data": {}, "teacher": {"model": "x"}}).key == "data.source"


def test_malformed_yaml_names_the_line(tmp_path):
    err = error_of(tmp_path, "data:\n  source: [a, b\nteacher: {}\n")
    assert "malformed YAML at line" in str(err)


def test_job_must_be_a_mapping(tmp_path):
    assert "mapping" in str(error_of(tmp_path, "- a\n- b\n"))


def test_missing_job_file(tmp_path):
    with pytest.raises(ConfigError, match="job file not found"):
        load_job(tmp_path / "nope.yaml")


def test_cli_validate_bad_input_is_one_line_exit_2(tmp_path):
    path = write(tmp_path, MINIMAL)
    proc = subprocess.run([sys.executable, "-m", "raykd.cli", "validate", str(path),
                           "train.zero_stage=4"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "train.zero_stage: must be 0-3, got 4" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == [path]  # nothing written


def test_cli_validate_checks_the_teacher_and_data(tmp_path, tiny_teacher):
    (tmp_path / "a.txt").write_text("hello world " * 50)
    job = {"data": {"source": str(tmp_path / "*.txt")}, "teacher": {"model": str(tiny_teacher)}}
    path = write(tmp_path, job)
    ok = subprocess.run([sys.executable, "-m", "raykd.cli", "validate", str(path)],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "1 data file(s)" in ok.stdout and "512 tokens" in ok.stdout
    for override, words in [("labels.top_k=600", "labels.top_k: 600 is larger than the teacher's"),
                            ("data.source=/nonexistent/*.txt", "no files match /nonexistent"),
                            (f"teacher.model={tmp_path / 'a.txt'}", "is a file but not a .gguf"),
                            (f"teacher.model={tmp_path}", "not a Hugging Face model directory"),
                            ("student.init_from_teacher=true", None),
                            ("student.init_layers=[0,1,2,9]", "index 9 does not exist")]:
        extra = ["student.init_from_teacher=true"] if "init_layers" in override else []
        proc = subprocess.run([sys.executable, "-m", "raykd.cli", "validate", str(path), override,
                               *extra], capture_output=True, text=True, timeout=120)
        if words is None:
            assert proc.returncode == 0, proc.stderr
            continue
        assert proc.returncode == 2, (override, proc.stdout, proc.stderr)
        assert words in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
