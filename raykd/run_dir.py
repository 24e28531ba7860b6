"""The run directory: job.yaml, metrics.jsonl, summary.json, student/.

    runs/<name>/
      job.yaml        the resolved job (every default filled in)
      metrics.jsonl   one JSON object per report from the workers
      tensorboard/    the same curves as TensorBoard event files
      events.jsonl    worker-group starts and what each resumed from
      summary.json    the outcome: status, steps, tokens, perplexities, wall time, export dir
      student/        the student in Hugging Face format, with the teacher's tokenizer
      checkpoints/    Ray Train checkpoints (unless train.storage points elsewhere)
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

from raykd.config import JobConfig, dump_yaml
from raykd.errors import UserError

try:  # the callback runs inside Ray Train's controller; the base class is all it needs
    from ray.train import UserCallback
except ImportError:  # pragma: no cover - ray is a hard dependency
    UserCallback = object  # type: ignore[misc,assignment]


def check_free(job: JobConfig) -> Path:
    """The run directory, refusing one that exists (unless run.overwrite) before anything
    is written."""
    path = job.run_dir
    if path.exists() and any(path.iterdir()) and not job.run.overwrite:
        raise UserError(f"run.name: run directory {path} already exists; choose another "
                        "run.name or set run.overwrite=true")
    return path


def create(job: JobConfig) -> Path:
    path = check_free(job)
    if path.exists() and job.run.overwrite:
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "job.yaml").write_text(dump_yaml(job))
    return path


def check_resumable(job: JobConfig) -> Path:
    """The run directory to continue: it exists, ran this very job, and is not finished."""
    import yaml

    from raykd.config import to_dict

    path = job.run_dir
    if not (path / "job.yaml").exists():
        raise UserError(f"run.resume: {path} holds no run to resume (no job.yaml)")
    summary = path / "summary.json"
    if summary.exists() and json.loads(summary.read_text()).get("status") == "succeeded":
        raise UserError(f"run.resume: {path} already finished; its student is in "
                        f"{path / 'student'}")
    before = yaml.safe_load((path / "job.yaml").read_text())
    now = to_dict(job)
    for key in _differences(before, now):
        if key not in ("run.resume", "run.verbose", "run.progress", "run.ray_address",
                       "run.num_cpus", "run.output_dir"):
            raise UserError(f"{key}: differs from the run's job.yaml ({path}); resume the "
                            f"run as it was, e.g. `raykd resume {path}`")
    return path


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _differences(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else k)
        return out
    return [] if a == b else [prefix]


CHECKPOINT_POINTER = "checkpoint.json"
EVENTS = "events.jsonl"


def append_event(run_dir: Path, event: dict[str, Any]) -> None:
    """events.jsonl: what happened to the run (worker-group starts and what they resumed)."""
    with open(run_dir / EVENTS, "a") as f:
        f.write(json.dumps({"time": time.time(), **event}) + "\n")


def read_events(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / EVENTS
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def latest_checkpoint(run_dir: Path) -> dict[str, Any] | None:
    """The newest checkpoint Ray Train has committed for this run (see RunRecorder)."""
    pointer = run_dir / CHECKPOINT_POINTER
    return json.loads(pointer.read_text()) if pointer.exists() else None


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_plain) + "\n")
    os.replace(tmp, path)


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)


class RunRecorder(UserCallback):  # type: ignore[misc,valid-type]
    """Ray Train callback (runs in the controller, on the driver's node): appends rank 0's
    reported metrics to metrics.jsonl and to TensorBoard event files in tensorboard/, and
    points checkpoint.json at each checkpoint once Ray Train has committed it (all ranks
    uploaded), which is what a restart builds on.

    Rows with a held-out evaluation also carry the teacher's held-out loss and perplexity
    (computed once by the driver), so that both curves sit side by side."""

    def __init__(self, run_dir: str, teacher_eval_loss: float | None = None):
        self.run_dir = run_dir
        self.teacher_eval_loss = teacher_eval_loss
        self._tb: Any = None

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any
                     ) -> None:
        if not metrics:
            return
        row = {k: v for k, v in metrics[0].items() if isinstance(v, (int, float, str, bool))}
        row = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
               for k, v in row.items()}
        if "eval_loss" in row and self.teacher_eval_loss is not None:
            row["teacher_eval_loss"] = self.teacher_eval_loss
            row["teacher_eval_ppl"] = math.exp(self.teacher_eval_loss)
        with open(os.path.join(self.run_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
        self._tensorboard(row)
        if checkpoint is not None:
            write_json_atomic(Path(self.run_dir, CHECKPOINT_POINTER),
                              {"path": checkpoint.path, "step": row.get("step"),
                               "epoch": row.get("epoch")})

    def _tensorboard(self, row: dict[str, Any]) -> None:
        try:
            if self._tb is None:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(os.path.join(self.run_dir, TENSORBOARD),
                                         flush_secs=10)
            step = int(row.get("step") or 0)
            for key, value in row.items():
                tag = tensorboard_tag(key)
                if tag and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(tag, value, step, walltime=row.get("time"))
            self._tb.flush()
        except ImportError:  # pragma: no cover - tensorboardX is a dependency
            return


TENSORBOARD = "tensorboard"
_NOT_CURVES = {"step", "epoch", "time", "labeled_at_max", "first_step_time", "samples",
               "tokens", "teacher_tokens", "eval_tokens"}


def tensorboard_tag(key: str) -> str | None:
    """metrics.jsonl key -> TensorBoard tag, grouped as the report groups them."""
    if key in _NOT_CURVES or (key.startswith("epoch") and key.endswith("_s")):
        return None
    if key.startswith("teacher_eval"):
        return f"eval/{key}"
    if key.startswith("eval_"):
        return f"eval/student_{key[5:]}"
    if key.startswith("teacher_") or key in ("replicas", "cache_hit_rate"):
        return f"teacher/{key}"
    return f"student/{key}"


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            rows.append(json.loads(line))
    return rows
