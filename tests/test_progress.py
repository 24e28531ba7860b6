"""The progress lines, the teacher pool's counters and the TensorBoard tags (no Ray)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from raykd import progress, telemetry
from raykd.run_dir import tensorboard_tag

ROW = {"step": 40, "loss": 3.2141, "kd_loss": 2.1, "ce_loss": 4.33, "lr": 9e-4,
       "tokens_per_s": 1180.4, "data_wait_frac": 0.41, "cache_hit_rate": 0.0}


def test_the_student_line_names_the_bottleneck():
    line = progress.student_line(ROW, 88, elapsed=200.0)
    assert "step    40/88" in line and "loss 3.214 (kd 2.100 ce 4.330)" in line
    assert "1,180 tok/s" in line and "eta 4m00s" in line
    assert line.endswith("bound by: teacher (waits 41%)")
    fed = progress.student_line({**ROW, "data_wait_frac": 0.02}, 88, 200.0)
    assert fed.endswith("bound by: student (waits 2%)")
    cached = progress.student_line({**ROW, "cache_hit_rate": 1.0}, 88, 200.0)
    assert "bound by: cache reads" in cached


def test_the_teacher_line():
    line = progress.teacher_line({"rows": 412, "teacher_tokens_per_s": 2310.2, "replicas": 1},
                                 703, {"cache_hit_rate": 0.25})
    assert line == ("  teacher     412/703 seqs labelled (59%) | 2,310 tok/s | 1 replica | "
                    "cache hits 25%")
    assert "every sequence comes from the label cache" in progress.teacher_line({}, 0, None)
    assert "2 replicas" in progress.teacher_line({"replicas": 2}, 10, None)
    # Not "0 tok/s | 0 replicas" (a stall, as read) before the pool reports or once it is gone.
    starting = progress.teacher_line({"rows": 0, "teacher_tokens_per_s": 0.0, "replicas": 0},
                                     10, None)
    assert starting.endswith("0/10 seqs labelled (0%) | starting the pool")
    done = progress.teacher_line({"rows": 10, "teacher_tokens_per_s": 0.0, "replicas": 0}, 10,
                                 {"cache_hit_rate": 0.5})
    assert done.endswith("10/10 seqs labelled (100%) | done | cache hits 50%")


def _metrics(path: Path, rows: list[dict]) -> None:
    with open(path, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def test_plain_mode_prints_a_pair_of_lines_per_new_report(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _metrics(path, [{**ROW, "step": 5}])  # a resumed run: this one was printed before
    printed: list[str] = []
    with progress.Follower(path, 88, 703, "plain", printed.append) as f:
        _metrics(path, [{**ROW, "step": 10}, {**ROW, "step": 15}])
        f._poll()
    teacher = [p for p in printed if p.startswith("  teacher")]
    student = [p for p in printed if p.startswith("  student")]
    assert [s.split("|")[0].split()[-1] for s in student] == ["10/88", "15/88"]
    assert len(teacher) == 2


def test_live_mode_redraws_two_lines_in_place(tmp_path):
    path = tmp_path / "metrics.jsonl"
    out = io.StringIO()
    f = progress.Follower(path, 88, 703, "live", stream=out)
    f._poll()  # before any report: the teacher's line alone
    _metrics(path, [ROW])
    f._poll()
    f._poll()
    text = out.getvalue()
    assert text.count("\x1b[1F") == 1 and text.count("\x1b[2F") == 1  # moved up, redrew
    assert text.rstrip("\n").rsplit("\n", 1)[-1].startswith("\x1b[2K  student")


def test_quiet_mode_prints_nothing(tmp_path):
    printed: list[str] = []
    with progress.Follower(tmp_path / "m.jsonl", 88, 703, "quiet", printed.append):
        _metrics(tmp_path / "m.jsonl", [ROW])
    assert printed == []


def test_auto_is_live_only_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert progress.resolve_mode("auto", Tty()) == "live"
    assert progress.resolve_mode("auto", io.StringIO()) == "plain"
    assert progress.resolve_mode("quiet", Tty()) == "quiet"


def test_pool_stats_say_when_the_teachers_cpus_are_idle():
    """A labelling pass's replicas free their node's CPUs once it has labelled all its rows;
    a new pass (a worker-group restart) starts from nothing labelled, and reports from
    another pass's pool, or of a batch labelled twice, do not count towards it."""
    stats = telemetry.PoolStats()
    stats.hello("eval", "n1", 1.0)  # a pool outside the passes (the held-out set's)
    assert stats.idle_cpus("n1") == 0  # no pass announced: nothing is known to be done
    first = stats.expect(16)
    stats.hello("a", "n1", 2.0, first)
    stats.hello("b", "n2", 4.0, first)
    stats.add("a", rows=8, tokens=512, busy_s=0.1, pass_id=first)
    stats.add("eval", rows=8, tokens=512, busy_s=0.1)
    assert stats.idle_cpus("n1") == 0
    stats.add("b", rows=8, tokens=512, busy_s=0.1, pass_id=first)
    assert stats.idle_cpus("n1") == 2.0 and stats.idle_cpus("n2") == 4.0
    assert stats.idle_cpus("n3") == 0
    assert stats.rows == 24  # the totals count every pool

    second = stats.expect(8)  # a restart
    assert second == first + 1 and stats.idle_cpus("n1") == 0
    stats.add("a", rows=8, tokens=512, busy_s=0.1, pass_id=first)  # the old pool's late batch
    assert stats.idle_cpus("n1") == 0
    stats.hello("c", "n1", 1.0, second)
    stats.add("c", rows=8, tokens=512, busy_s=0.1, pass_id=second)
    assert stats.idle_cpus("n1") == 1.0

    third = stats.expect(24)
    stats.hello("e", "n1", 1.0, third)
    stats.add("a", rows=8, tokens=512, busy_s=0.1, pass_id=second, first=8)  # a late report
    stats.add("e", rows=8, tokens=512, busy_s=0.1, pass_id=third, first=0)
    stats.add("f", rows=8, tokens=512, busy_s=0.1, pass_id=third, first=0)  # a retried batch
    assert stats.idle_cpus("n1") == 0  # 8 of 24 rows, not 16
    stats.add("e", rows=8, tokens=512, busy_s=0.1, pass_id=third, first=8)  # not the late one
    assert stats.idle_cpus("n1") == 0
    stats.add("e", rows=8, tokens=512, busy_s=0.1, pass_id=third)  # no first: counted
    assert stats.idle_cpus("n1") == 1.0

    stats.expect(0)  # everything cached: no pool starts, and no replica holds CPUs
    assert stats.idle_cpus("n1") == 0
    stats.expect(8)
    stats.hello("d", "n1", 1.0, -1)  # a pool whose announcement failed: it may still run
    stats.add("d", rows=8, tokens=512, busy_s=0.1, pass_id=-1)
    assert stats.idle_cpus("n1") == 0


def test_pool_stats_and_the_teacher_rate():
    stats = telemetry.PoolStats()
    stats.hello("a")
    stats.add("a", rows=8, tokens=1000, busy_s=0.5)
    stats.add("b", rows=8, tokens=1000, busy_s=0.5)
    snap = stats.snapshot()
    assert snap["rows"] == 16 and snap["tokens"] == 2000
    rate = telemetry.Rate()
    first = rate.update({**snap, "time": 100.0, "replicas": 2})
    assert first == {"teacher_tokens": 2000.0, "replicas": 2.0}  # no rate from one snapshot
    second = rate.update({**snap, "tokens": 6000, "time": 102.0, "replicas": 2})
    assert second["teacher_tokens_per_s"] == pytest.approx(2000.0)
    # Over the last 30 s window, not between the last two polls: a poll that saw no new
    # batch does not read 0 while the window still holds progress.
    third = rate.update({**snap, "tokens": 6000, "time": 103.0, "replicas": 2})
    assert third["teacher_tokens_per_s"] == pytest.approx(4000 / 3)
    stalled = rate.update({**snap, "tokens": 6000, "time": 140.0, "replicas": 2})
    assert stalled["teacher_tokens_per_s"] == pytest.approx(0.0)
    assert rate.update(None) == {}


@pytest.mark.parametrize("key, tag", [
    ("loss", "student/loss"), ("tokens_per_s", "student/tokens_per_s"),
    ("eval_ppl", "eval/student_ppl"), ("teacher_eval_ppl", "eval/teacher_eval_ppl"),
    ("teacher_tokens_per_s", "teacher/teacher_tokens_per_s"), ("replicas", "teacher/replicas"),
    ("cache_hit_rate", "teacher/cache_hit_rate"), ("step", None), ("epoch0_s", None),
])
def test_tensorboard_tags(key, tag):
    assert tensorboard_tag(key) == tag
