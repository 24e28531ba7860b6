"""The two progress lines of `raykd run`: the teacher pool's and the students'.

    teacher   412/703 seqs labelled (59%) | 2,310 tok/s | 1 replica | cache hits 0%
    student   step 40/88 | loss 3.214 (kd 2.10 ce 4.33) | lr 9.0e-04 | 1,180 tok/s | eta 3m10s
              | bound by: teacher (waits 41%)

`run.progress` picks how they are shown: `live` redraws both lines in place (a terminal),
`plain` prints one pair per report of the workers (logs, `ray job logs`), `quiet` prints
nothing, `auto` is live on a terminal and plain elsewhere.

The bottleneck comes from the students' own clock: the share of wall time the slowest-fed
rank spent waiting for its next batch (`data_wait_frac`). Waiting much means labels (the
teacher pool, or the cache reader) are the limit; waiting little means the students are.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from raykd import telemetry
from raykd.run_dir import read_metrics

# Plain mode prints the teacher's line at least this often while no student rows arrive.
PLAIN_EVERY_S = 15.0
# Above this share of time spent waiting for data the students are starved.
TEACHER_BOUND = 0.25


def resolve_mode(mode: str, stream: TextIO | None = None) -> str:
    if mode != "auto":
        return mode
    stream = stream or sys.stdout
    return "live" if hasattr(stream, "isatty") and stream.isatty() else "plain"


class Follower:
    """Prints the progress lines while training runs (a thread on the driver), reading the
    rows rank 0 appends to metrics.jsonl and the teacher pool's PoolStats actor."""

    def __init__(self, path: Path | None, total_steps: int, to_label: int, mode: str,
                 printer: Callable[[str], None] = print, pool: Any = None,
                 stream: TextIO | None = None, note: str | None = None):
        self.path = path
        self.total_steps = total_steps
        self.to_label = to_label
        self.mode = resolve_mode(mode, stream)
        self.printer = printer
        self.stream = stream or sys.stdout
        self.pool = pool
        self.note = note  # what the teacher line says when the pool labels nothing
        self.rate = telemetry.Rate()
        self.teacher: dict[str, float] = {}
        self.row: dict[str, Any] | None = None
        self._stop = threading.Event()
        # A resumed run prints only what is new; `raykd label` has no student rows.
        self._seen = len(read_metrics(path)) if path else 0
        self._drawn = 0
        self._printed = time.time()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._start = time.time()
        self._rows_at_start: float | None = None

    def __enter__(self) -> Follower:
        if self.mode != "quiet":
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        if self.mode != "quiet":
            self._poll()
            if self.mode == "live" and self._drawn:
                self.stream.write("\n")
                self.stream.flush()

    def _loop(self) -> None:
        while not self._stop.wait(1.0):
            self._poll()

    def _poll(self) -> None:
        snap = telemetry.snapshot(self.pool, timeout_s=2.0)
        if snap is not None:
            self.teacher = {**self.teacher, **self.rate.update(snap), "rows": snap["rows"]}
            if self._rows_at_start is None:
                self._rows_at_start = float(snap["rows"])
        rows = read_metrics(self.path) if self.path else []
        new = rows[self._seen:]
        self._seen = len(rows)
        if new:
            self.row = new[-1]
        if self.mode == "live":
            self._draw()
            return
        for row in new:
            self.printer(self.teacher_line())
            self.printer(student_line(row, self.total_steps, time.time() - self._start))
            self._printed = time.time()
        if not new and self.teacher and time.time() - self._printed > PLAIN_EVERY_S:
            self.printer(self.teacher_line())  # labelling alone (`raykd label`, epoch 1)
            self._printed = time.time()

    def _draw(self) -> None:
        lines = [self.teacher_line()]
        if self.row is not None:
            lines.append(student_line(self.row, self.total_steps, time.time() - self._start))
        up = f"\x1b[{self._drawn}F" if self._drawn else ""
        self.stream.write(up + "".join(f"\x1b[2K{line}\n" for line in lines))
        self.stream.flush()
        self._drawn = len(lines)

    def teacher_line(self) -> str:
        return teacher_line(self.teacher, self.to_label, self.row, self.note)


def teacher_line(teacher: dict[str, float], to_label: int, row: dict[str, Any] | None,
                 note: str | None = None) -> str:
    parts = []
    # Before the first replica reports, and after the last has gone, "0 tok/s | 0
    # replicas" would read as a stall: say what is happening instead.
    state = None
    if to_label:
        done = min(int(teacher.get("rows", 0)), to_label)
        parts.append(f"{done:>6,}/{to_label:,} seqs labelled ({100 * done / to_label:.0f}%)")
        if done >= to_label:
            state = "done"
        elif done == 0 and not teacher.get("replicas"):
            state = "starting the pool"
    else:
        parts.append(note or "every sequence comes from the label cache")
    if state is not None:
        parts.append(state)
    else:
        if "teacher_tokens_per_s" in teacher:
            parts.append(f"{teacher['teacher_tokens_per_s']:,.0f} tok/s")
        if "replicas" in teacher:
            n = int(teacher["replicas"])
            parts.append(f"{n} replica{'s' if n != 1 else ''}")
    if row is not None and row.get("cache_hit_rate") is not None:
        parts.append(f"cache hits {100 * row['cache_hit_rate']:.0f}%")
    return "  teacher  " + " | ".join(parts)


def student_line(row: dict[str, Any], total_steps: int, elapsed: float) -> str:
    step = row.get("step", 0)
    parts = [f"step {step:>5}/{total_steps}"]
    if row.get("loss") is not None:
        parts.append(f"loss {row['loss']:.3f} (kd {row['kd_loss']:.3f} ce {row['ce_loss']:.3f})")
        parts.append(f"lr {row['lr']:.2e}")
        parts.append(f"{row['tokens_per_s']:,.0f} tok/s")
    if row.get("eval_ppl") is not None:
        parts.append(f"eval ppl {row['eval_ppl']:.1f}")
    if step and total_steps and step < total_steps:
        parts.append(f"eta {_duration(elapsed / step * (total_steps - step))}")
    wait = row.get("data_wait_frac")
    if wait is not None:
        labels = "cache reads" if (row.get("cache_hit_rate") or 0) > 0.5 else "teacher"
        side = labels if wait > TEACHER_BOUND else "student"
        parts.append(f"bound by: {side} (waits {100 * wait:.0f}%)")
    return "  student  " + " | ".join(parts)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
