"""The job file: a typed tree of dataclasses, loaded from YAML with `a.b=c` overrides.

Each part of raykd owns its config (`DataConfig` beside the data code, `TeacherConfig`
beside the teacher, ...); `JobConfig` only composes them and checks what crosses parts.
Errors name the dotted key: ``train.zero_stage: must be 0-3, got 4``.

    job = load_job("jobs/quickstart.yaml", ["train.lr=1e-3"])
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from raykd.data.config import DataConfig
from raykd.data.soft_labels import DEFAULT_TAIL_SAMPLES, LabelConfig
from raykd.errors import ConfigError
from raykd.fields import doc, required
from raykd.student.config import LossConfig, StudentConfig, TrainConfig
from raykd.teacher.config import TeacherConfig

T = TypeVar("T")


@dataclass
class RunOptions:
    """Where the run lives and how Ray is reached."""

    name: str = doc("raykd", "Run name; the run directory is output_dir/name.")
    output_dir: str = doc("runs", "Directory that holds run directories.")
    seed: int = doc(
        0, "Seed for the student's initial weights, its dropout and the data order (data.shuffle)."
    )
    ray_address: str | None = doc(
        None, "Ray cluster to join ('auto', 'ray://...'); null starts embedded Ray here."
    )
    num_cpus: int | None = doc(
        None, "Logical CPUs for embedded Ray; null sizes it for the job (at least the cores)."
    )
    overwrite: bool = doc(False, "Replace an existing run directory of the same name.")
    resume: bool = doc(
        False, "Continue the run in output_dir/name from its latest complete checkpoint "
        "(after a crash or a lost driver); `raykd resume RUN_DIR` sets it."
    )
    verbose: bool = doc(False, "Forward Ray worker logs and Ray Data progress bars.")
    progress: str = doc(
        "auto", "How progress is shown: live (two lines redrawn in place), plain (one "
        "teacher and one student line per report, for logs), quiet (only the outcome), "
        "auto (live on a terminal, else plain); `--plain` / `--quiet` set it."
    )

    def validate(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ConfigError("name", f"must be a plain directory name, got {self.name!r}")
        if self.resume and self.overwrite:
            raise ConfigError("resume", "cannot be combined with run.overwrite")
        if self.progress not in PROGRESS_MODES:
            raise ConfigError("progress", f"must be one of {', '.join(PROGRESS_MODES)}, "
                              f"got {self.progress!r}")
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ConfigError("num_cpus", f"must be >= 1, got {self.num_cpus}")


PROGRESS_MODES = ("auto", "live", "plain", "quiet")


@dataclass
class JobConfig:
    """One distillation job: data -> teacher soft labels -> student."""

    data: DataConfig = required("Where the text comes from and how it is packed.")
    teacher: TeacherConfig = required("The model whose soft labels the student learns from.")
    student: StudentConfig = doc(StudentConfig(), "The model being trained.")
    labels: LabelConfig = doc(LabelConfig(), "Soft-label settings shared by teacher and loss.")
    loss: LossConfig = doc(LossConfig(), "How soft and hard labels are mixed.")
    train: TrainConfig = doc(TrainConfig(), "Workers, optimiser, ZeRO, schedule, checkpoints.")
    run: RunOptions = doc(RunOptions(), "Run name, output directory and Ray connection.")

    def validate(self) -> None:
        t = self.train
        per_step = t.micro_batch_size * t.num_workers
        if t.batch_size % per_step:
            raise ConfigError(
                "train.batch_size",
                f"{t.batch_size} is not divisible by train.micro_batch_size x "
                f"train.num_workers = {t.micro_batch_size} x {t.num_workers} = {per_step}",
            )
        if self.labels.tail_samples is None:  # resolved here, where the loss is known
            self.labels = dataclasses.replace(
                self.labels,
                tail_samples=DEFAULT_TAIL_SAMPLES if self.loss.kind == "forward_kl" else 0)
        if self.labels.tail_samples and self.loss.kind != "forward_kl":
            raise ConfigError(
                "labels.tail_samples",
                f"tail samples estimate the forward KL only; loss.kind is {self.loss.kind} "
                "(set labels.tail_samples: 0, or loss.kind: forward_kl)",
            )

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name


# --------------------------------------------------------------------------- loading


def load_job(path: str | Path, overrides: list[str] | None = None) -> JobConfig:
    """Read a YAML job file, apply `a.b=c` overrides, build and validate the tree."""
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError("", "job file not found", source) from None
    except OSError as e:
        raise ConfigError("", f"cannot read job file: {e.strerror}", source) from None
    except UnicodeDecodeError as e:
        raise ConfigError("", f"not a YAML text file (byte {e.start} is not UTF-8)",
                          source) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError("", f"malformed YAML{where}: {problem}", source) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("", f"a job file is a mapping of sections, got {_kind(data)}", source)
    try:
        data = apply_overrides(data, overrides or [])
        return job_from_dict(data)
    except ConfigError as e:
        raise ConfigError(e.key, e.message, source) from None


def job_from_dict(data: dict[str, Any]) -> JobConfig:
    job = from_dict(JobConfig, data)
    return job


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`train.lr=1e-3` sets data["train"]["lr"]; values are parsed as YAML scalars."""
    import copy

    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError("", f"override {item!r} is not of the form key.sub=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(".".join(parts[: i + 1]), "is a value, not a section")
            node = child
        node[parts[-1]] = value
    return data


def from_dict(cls: type[T], data: Any, key: str = "") -> T:
    """Build dataclass `cls` from plain data, checking keys, types and `validate()`."""
    if not isinstance(data, dict):
        raise ConfigError(key, f"must be a mapping, got {_kind(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for name in data:
        if name not in fields:
            close = difflib.get_close_matches(str(name), list(fields), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            known = ", ".join(fields)
            raise ConfigError(_join(key, str(name)), f"unknown key{hint}; known keys: {known}")
    kwargs = {}
    for name, f in fields.items():
        sub = _join(key, name)
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], sub)
        elif f.metadata.get("required"):
            raise ConfigError(sub, "is required")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        try:
            validate()
        except ConfigError as e:
            # Part configs raise keys relative to themselves, the job raises absolute ones.
            raise (e.under(key) if key else e) from None
    return obj


def to_dict(obj: Any) -> Any:
    """The plain-data form of a config tree (what `job.yaml` in a run directory holds)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def dump_yaml(job: JobConfig) -> str:
    return yaml.safe_dump(to_dict(job), sort_keys=False)


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(key, "must not be null")
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, key)
            except ConfigError as e:
                errors.append(e.message)
        raise ConfigError(key, " or ".join(dict.fromkeys(errors)))
    if value is None:
        raise ConfigError(key, f"must be {_type_name(tp)}, got null")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            listed = ", ".join(str(c) for c in choices)
            raise ConfigError(key, f"must be one of {listed}; got {value!r}{hint}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(key, f"must be a list, got {_kind(value)}")
        return [_convert(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(key, f"must be a mapping, got {_kind(value)}")
        return {str(k): _convert(val_tp, v, _join(key, str(k))) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"must be true or false, got {_kind(value)} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"must be an integer, got {_kind(value)} {value!r}")
        return value
    if tp is float:
        # YAML 1.1 reads `1e-3` (no dot) as a string; accept what float() accepts.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"must be a number, got {_kind(value)} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"must be a string, got {_kind(value)} {value!r}")
        return value
    raise TypeError(f"config type {tp!r} at {key} is not supported")  # a bug in raykd


def _type_name(tp: Any) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return names.get(tp, "a mapping" if dataclasses.is_dataclass(tp) else str(tp))


def _kind(value: Any) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a mapping",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
