"""Checks that need the outside world but no cluster: files exist, the teacher is a model,
the student fits the teacher, k fits the vocabulary. Run by `raykd validate` and before
`raykd run` takes any resources, so bad input fails fast and leaves nothing behind."""

from __future__ import annotations

from dataclasses import dataclass

from raykd import storage
from raykd.config import JobConfig
from raykd.errors import ConfigError, UserError
from raykd.student.model import evenly_spaced
from raykd.teacher.loading import ModelInfo, describe


@dataclass
class Preflight:
    files: storage.FileSet
    teacher: ModelInfo


def preflight(job: JobConfig) -> Preflight:
    files = storage.expand(job.data.sources, "data.source")
    if job.data.max_files is not None:
        files.paths, files.names = files.paths[: job.data.max_files], files.names[: job.data.max_files]
    info = describe(job.teacher.model)
    check_against_teacher(job, info)
    return Preflight(files=files, teacher=info)


def check_against_teacher(job: JobConfig, info: ModelInfo) -> None:
    if job.labels.top_k > info.vocab_size:
        raise ConfigError("labels.top_k", f"{job.labels.top_k} is larger than the teacher's "
                          f"vocabulary ({info.vocab_size} tokens)")
    s = job.student
    if s.init_from_teacher:
        layers = s.init_layers or evenly_spaced(info.num_layers, s.num_layers)
        bad = [i for i in layers if i >= info.num_layers]
        if bad:
            raise ConfigError("student.init_layers", f"teacher has {info.num_layers} layers; "
                              f"index {bad[0]} does not exist")
    hidden = s.hidden_size or info.hidden_size
    heads = s.num_attention_heads or info.num_attention_heads
    kv = s.num_key_value_heads or info.num_key_value_heads
    if hidden % heads:
        raise ConfigError("student.num_attention_heads",
                          f"{heads} heads do not divide hidden_size {hidden}")
    if heads % kv:
        raise ConfigError("student.num_key_value_heads",
                          f"{kv} KV heads do not divide {heads} attention heads")
    if info.model_type == "unknown":
        raise UserError("teacher.model: config.json has no model_type")
