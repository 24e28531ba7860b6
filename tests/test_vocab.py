"""Vocabulary preflight for pretrained students: one tokenizer, padded logits only on
request, anything else refused before Ray starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from raykd.config import job_from_dict
from raykd.errors import ConfigError
from raykd.preflight import preflight
from tests.tiny import make_llama, make_tokenizer


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_teacher) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vocab")
    other_tok = root / "other-tokenizer"
    make_tokenizer(other_tok, vocab_size=400)
    return {
        "same": make_llama(root / "same", layers=1, tokenizer_from=tiny_teacher),
        "padded": make_llama(root / "padded", layers=1, vocab_size=520,
                             tokenizer_from=tiny_teacher),
        "foreign": make_llama(root / "foreign", layers=1, vocab_size=400, tokenizer_from=other_tok),
    }


def job(teacher: Path, student: Path, tmp_path: Path, **student_keys):
    (tmp_path / "d.txt").write_text("Shall I compare thee to a summer's day? " * 80)
    return job_from_dict({
        "run": {"name": "v", "output_dir": str(tmp_path / "runs")},
        "data": {"source": str(tmp_path / "d.txt"), "seq_len": 32, "eval_fraction": 0.2},
        "teacher": {"model": str(teacher)},
        "labels": {"top_k": 8},
        "student": {"model": str(student), **student_keys},
        "train": {"max_steps": 2, "log_every": 1},
    })


def test_same_tokenizer_same_size_passes(tiny_teacher, models, tmp_path):
    assert preflight(job(tiny_teacher, models["same"], tmp_path)).vocab_limit is None


def test_padded_vocab_needs_truncate(tiny_teacher, models, tmp_path):
    with pytest.raises(ConfigError, match=r"student.vocab: the teacher has 512 logits and the "
                                          r"student 520 .* set student.vocab=truncate"):
        preflight(job(tiny_teacher, models["padded"], tmp_path))
    checks = preflight(job(tiny_teacher, models["padded"], tmp_path, vocab="truncate"))
    assert checks.vocab_limit == 512


def test_another_tokenizer_is_refused(tiny_teacher, models, tmp_path):
    with pytest.raises(ConfigError, match="student.model: its tokenizer differs from the teacher"):
        preflight(job(tiny_teacher, models["foreign"], tmp_path, vocab="truncate"))


def test_pretrained_student_excludes_building_keys(tiny_teacher, models, tmp_path):
    with pytest.raises(ConfigError, match="student.model: a pretrained student"):
        job(tiny_teacher, models["same"], tmp_path, init_from_teacher=True)


@pytest.mark.ray
def test_truncated_vocab_trains(tiny_teacher, models, tmp_path):
    import ray

    from raykd.runner import run

    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False)
    try:
        s = run(job(tiny_teacher, models["padded"], tmp_path, vocab="truncate"),
                log=lambda _: None).summary
    finally:
        ray.shutdown()
    assert s["status"] == "succeeded" and s["steps"] == 2
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(s["export_dir"])
    assert exported.config.vocab_size == 520  # the student keeps its own padded head
