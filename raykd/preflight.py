"""Checks that need the outside world but no cluster: files exist, the teacher is a model,
the student fits the teacher, k fits the vocabulary. Run by `raykd validate` and before
`raykd run` takes any resources, so bad input fails fast and leaves nothing behind."""

from __future__ import annotations

from dataclasses import dataclass

from raykd import storage
from raykd.config import JobConfig
from raykd.errors import ConfigError, UserError
from raykd.teacher.loading import ModelInfo, describe


@dataclass
class Preflight:
    files: storage.FileSet
    teacher: ModelInfo
    vocab_limit: int | None  # compare logits over this many tokens (student.vocab: truncate)


def preflight(job: JobConfig) -> Preflight:
    check_local_dirs(job)
    files = storage.expand(job.data.sources, "data.source")
    if job.train.storage:
        storage.check_store(job.train.storage, "train.storage")
    if job.labels.cache and job.labels.cache != "auto":
        storage.check_store(job.labels.cache, "labels.cache")
    if job.data.max_files is not None:
        n = job.data.max_files
        files.paths, files.names, files.sizes = files.paths[:n], files.names[:n], files.sizes[:n]
    check_data(job, files)
    info = describe(job.teacher.model)
    limit = None
    if job.student.model is not None:
        limit = check_vocab(job, info)
    check_against_teacher(job, info, limit)
    if job.teacher.tp_size > 1:
        check_tensor_parallel(job, info)
    return Preflight(files=files, teacher=info, vocab_limit=limit)


def check_local_dirs(job: JobConfig) -> None:
    """Local output locations must be directories where they exist (a file in the way
    would otherwise fail the run only after Ray started, with a traceback)."""
    import os

    outputs = [(job.run.output_dir, "run.output_dir"), (str(job.run_dir), "run.name"),
               (job.train.storage, "train.storage"), (job.labels.cache, "labels.cache")]
    for uri, key in outputs:
        if not uri or uri == "auto" or storage.is_remote(uri):
            continue
        path = storage.local_path(uri, key)
        if os.path.exists(path) and not os.path.isdir(path):
            raise ConfigError(key, f"{path} is a file; outputs need a directory there")


def check_data(job: JobConfig, files: storage.FileSet) -> None:
    """Cheap checks of what packing will read, so that `raykd validate` catches them and
    `raykd run` fails before Ray starts: something is held out, not every file is empty,
    and the first non-empty file of each format has the text field (jsonl) or column
    (parquet). Packing still checks every line of every file."""
    from raykd.data.packing import detect_format

    # DataConfig admits 0 for both, but every run and `raykd label` then stop after Ray
    # started, at "no held-out sequences" (a run evaluates its student on them).
    for key in ("eval_fraction", "eval_max_samples"):
        if getattr(job.data, key) == 0:
            raise ConfigError(f"data.{key}", "is 0, so nothing is held out to evaluate the "
                              "student on; a run needs at least one held-out sequence")
    if files.sizes and not any(files.sizes):
        what = f"{files.paths[0]} is" if len(files.paths) == 1 else (
            f"all {len(files.paths)} files ({files.paths[0]}, ...) are")
        raise UserError(f"data.source: {what} empty; there is no text to distil")
    checked: set[str] = set()
    for path, name, size in zip(files.paths, files.names, files.sizes or [1] * len(files.paths)):
        fmt = detect_format(name, job.data.format)
        if size == 0 or fmt in checked:
            continue
        checked.add(fmt)
        if fmt == "jsonl":
            _check_jsonl_head(files, path, job.data.text_key)
        elif fmt == "parquet":
            _check_parquet_schema(files, path, job.data.text_key)


def _check_jsonl_head(files: storage.FileSet, path: str, text_key: str) -> None:
    from raykd.data.packing import documents

    try:
        with files.fs.open_input_stream(path) as f:
            head = f.read(1 << 16)
    except storage.pa_errors() as e:
        raise UserError(f"data.source: cannot read {path}: {e}") from None
    lines = head.split(b"\n")
    if len(head) == 1 << 16:
        lines = lines[:-1]  # the last line may be cut in the middle
    first = next((i for i, line in enumerate(lines) if line.strip()), None)
    if first is not None:
        documents(b"\n".join(lines[: first + 1]), "jsonl", text_key, path)


def _check_parquet_schema(files: storage.FileSet, path: str, text_key: str) -> None:
    import pyarrow.parquet as pq

    try:
        with files.fs.open_input_file(path) as f:
            names = pq.read_schema(f).names
    except storage.pa_errors() as e:
        raise UserError(f"{path}: not a readable parquet file: {_first_line(e)}") from None
    if text_key not in names:
        raise UserError(f"{path}: has no column '{text_key}' (data.text_key); its columns: "
                        f"{', '.join(names)}")


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


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
                          f"{_token_id(vocab_s, example)} in the student and "
                          f"{_token_id(vocab_t, example)} in the teacher; distillation over "
                          "top-k ids needs one tokenizer")
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


def _token_id(vocab: dict[str, int], token: str) -> str:
    return f"id {vocab[token]}" if token in vocab else "absent"


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
        # Imported here: it brings torch (~1 s), which `raykd validate` otherwise never needs.
        from raykd.student.model import evenly_spaced

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
