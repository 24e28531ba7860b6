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
    vocab_limit: int | None  # compare logits over this many tokens (student.vocab: truncate)


def preflight(job: JobConfig) -> Preflight:
    files = storage.expand(job.data.sources, "data.source")
    if job.train.storage:
        storage.check_store(job.train.storage, "train.storage")
    if job.labels.cache and job.labels.cache != "auto":
        storage.check_store(job.labels.cache, "labels.cache")
    if job.data.max_files is not None:
        files.paths, files.names = files.paths[: job.data.max_files], files.names[: job.data.max_files]
    info = describe(job.teacher.model)
    limit = None
    if job.student.model is not None:
        limit = check_vocab(job, info)
    check_against_teacher(job, info, limit)
    if job.teacher.tp_size > 1:
        check_tensor_parallel(job, info)
    return Preflight(files=files, teacher=info, vocab_limit=limit)


def check_tensor_parallel(job: JobConfig, info: ModelInfo) -> None:
    from raykd.teacher.loading import materialize
    from raykd.teacher.tensor_parallel import autotp_supported

    if not autotp_supported(materialize(job.teacher.model)):
        raise ConfigError("teacher.tp_size", f"DeepSpeed AutoTP cannot split {info.model_type} "
                          f"models; use tp_size: 1 (or more replicas) for this teacher")
    if info.num_key_value_heads < job.teacher.tp_size:
        raise ConfigError("teacher.tp_size", f"{job.teacher.tp_size} ranks but the teacher has "
                          f"only {info.num_key_value_heads} key/value heads to split")


def check_vocab(job: JobConfig, teacher: ModelInfo) -> int | None:
    """A pretrained student must speak the teacher's tokenizer. Identical tokenizers with
    equal logit counts pass; padded logit counts (same tokenizer) need student.vocab:
    truncate and return the count both sides are cut to; anything else is refused."""
    from raykd.data.packing import load_tokenizer
    from raykd.teacher.loading import materialize

    assert job.student.model is not None
    student = describe(job.student.model, "student.model")
    tok_t = load_tokenizer(materialize(job.teacher.model))
    tok_s = load_tokenizer(materialize(job.student.model, "student.model"))
    vocab_t, vocab_s = tok_t.get_vocab(), tok_s.get_vocab()
    if vocab_t != vocab_s:
        differ = sorted(t for t in set(vocab_t) | set(vocab_s) if vocab_t.get(t) != vocab_s.get(t))
        example = differ[0]
        raise ConfigError("student.model", f"its tokenizer differs from the teacher's: "
                          f"{len(differ)} tokens differ, e.g. {example!r} is "
                          f"{vocab_s.get(example)} in the student and {vocab_t.get(example)} "
                          "in the teacher; distillation over top-k ids needs one tokenizer")
    if student.vocab_size == teacher.vocab_size:
        return None
    tokens = len(tok_t)
    if job.student.vocab != "truncate":
        raise ConfigError("student.vocab", f"the teacher has {teacher.vocab_size} logits and the "
                          f"student {student.vocab_size} over the same tokenizer ({tokens} "
                          f"tokens); set student.vocab=truncate to compare the first {tokens}")
    if tokens > min(student.vocab_size, teacher.vocab_size):
        raise ConfigError("student.vocab", f"the tokenizer has {tokens} tokens, more than the "
                          f"{min(student.vocab_size, teacher.vocab_size)} logits of the smaller "
                          "model; truncation would drop real tokens")
    return tokens


def check_against_teacher(job: JobConfig, info: ModelInfo, vocab_limit: int | None = None
                          ) -> None:
    vocab = vocab_limit or info.vocab_size
    if job.labels.top_k > vocab:
        raise ConfigError("labels.top_k", f"{job.labels.top_k} is larger than the teacher's "
                          f"vocabulary ({vocab} tokens)")
    if job.student.model is not None:
        return
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
