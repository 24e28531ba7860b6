"""`raykd report` and `raykd compare`: on a real run directory made by `raykd run` (tiny
models, ~1 minute), and on written run directories that hold what a real run lacks
(teacher throughput, pool size, a restart, an unfinished run). The page is rendered by a
real headless browser and its screenshot checked for the plots' pixels."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.tiny import shakespeare

SECTIONS = ("summary", "loss", "eval_ppl", "throughput", "replicas")


def raykd(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    exe = shutil.which("raykd") or str(Path(sys.executable).parent / "raykd")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"}, check=False)


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory, tiny_teacher: Path) -> Path:
    """A finished run of the tiny teacher: 6 steps, a report every step, eval every 2."""
    root = tmp_path_factory.mktemp("report")
    job = root / "tiny.yaml"
    job.write_text(yaml.safe_dump({
        "run": {"name": "tiny", "output_dir": str(root / "runs")},
        "data": {"source": shakespeare("sonnets"), "seq_len": 32, "eval_fraction": 0.05,
                 "eval_max_samples": 8},
        "teacher": {"model": str(tiny_teacher), "batch_size": 8},
        "labels": {"top_k": 8},
        "student": {"num_layers": 2},
        "train": {"max_steps": 6, "log_every": 1, "eval_every": 2, "warmup_steps": 1,
                  "lr": 3e-3},
    }))
    proc = raykd("run", str(job))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root / "runs" / "tiny"


def write_run(path: Path, summary: dict | None, rows: list[dict], events: list[dict]) -> Path:
    """A run directory as raykd leaves it (metrics.jsonl, events.jsonl, summary.json)."""
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    if summary is not None:
        (path / "summary.json").write_text(json.dumps(summary))
    return path


def autoscaled_run(path: Path, steps: int = 40, restart_at: int | None = 20,
                   finished: bool = True) -> Path:
    """Metrics of a run whose teacher pool grew 1 -> 3 and whose workers restarted once."""
    t0, rows = 1_800_000_000.0, []
    rows.append({"step": 0, "time": t0 + 5, "eval_loss": 10.0, "eval_ppl": 22026.5})
    for step in range(2, steps + 1, 2):
        loss = 6.0 * 0.95 ** step + 2.0
        row = {"step": step, "epoch": 0, "tokens": step * 8 * 128, "time": t0 + 5 + 3 * step,
               "loss": loss,
               "kd_loss": loss * 0.6, "ce_loss": loss * 1.4, "lr": 1e-3,
               "tokens_per_s": 900.0 + 10 * step, "teacher_tokens_per_s": 1000.0 + 20 * step,
               "replicas": min(3, 1 + step // 12)}
        if step % 10 == 0:
            row |= {"eval_loss": loss + 1.5, "eval_ppl": 2.718 ** (loss + 1.5)}
        rows.append(row)
    events = [{"time": t0, "event": "workers_start", "resume_step": 0, "skipped": 0}]
    if restart_at is not None:
        events.append({"time": t0 + 80, "event": "workers_start", "resume_step": restart_at,
                       "skipped": 160})
    summary = {"status": "succeeded", "steps": steps, "tokens": steps * 8 * 128,
               "student_eval_ppl": rows[-1].get("eval_ppl"), "teacher_eval_ppl": 42.0,
               "wall_s": 150.0, "export_dir": str(path / "student")} if finished else None
    return write_run(path, summary, rows, events)


def inlined_pngs(page: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]


def check_self_contained(page: str) -> None:
    assert "<script" not in page and "<link" not in page
    assert not re.search(r'(src|href)="(?!data:)', page), "a reference outside the page"
    assert "url(" not in page


def test_report_of_a_real_run_renders_in_a_browser(real_run: Path, tmp_path: Path) -> None:
    from PIL import Image

    proc = raykd("report", str(real_run), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((real_run / "summary.json").read_text())
    assert f"tiny: succeeded, {summary['steps']} steps" in proc.stdout
    assert f"teacher {summary['teacher_eval_ppl']:,.1f}" in proc.stdout
    assert f"wrote {real_run / 'report.html'} (4 plots" in proc.stdout
    for name in ("loss", "eval_ppl", "throughput", "replicas"):
        with Image.open(real_run / f"{name}.png") as img:
            assert img.format == "PNG" and img.size == (800, 360)

    page = (real_run / "report.html").read_text()
    check_self_contained(page)
    for section in (*SECTIONS, "job"):
        assert f'<section id="{section}">' in page
    assert "no replicas column" not in page  # the run recorded its teacher pool
    assert "teacher tokens/s" in page
    pngs = inlined_pngs(page)
    assert len(pngs) == 4
    assert pngs[0] == (real_run / "loss.png").read_bytes()
    for data in pngs:
        assert Image.open(io.BytesIO(data)).size == (800, 360)

    shot = screenshot(real_run / "report.html", tmp_path)
    with Image.open(shot) as img:
        assert img.size == (1200, 2000)
        rgb = img.convert("RGB")
        gray = rgb.convert("L")
        # Not blank: a white page has no variance. And the plots were drawn: their lines
        # are matplotlib's blue and orange, which nothing else on the page uses.
        from PIL import ImageStat

        assert ImageStat.Stat(gray).stddev[0] > 20
        colors = rgb.getcolors(maxcolors=1 << 20)
        assert colors is not None
        blue = sum(n for n, c in colors if _near(c, (31, 119, 180)))
        orange = sum(n for n, c in colors if _near(c, (255, 127, 14)))
        assert blue > 500 and orange > 200, (blue, orange)


def _near(color: tuple[int, ...], ref: tuple[int, int, int]) -> bool:
    return sum(abs(a - b) for a, b in zip(color, ref)) < 60


def screenshot(page: Path, tmp_path: Path) -> Path:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium is not installed (.ci/run installs it: apt-get install chromium)")
    shot = tmp_path / "report.png"
    proc = subprocess.run(
        [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         f"--user-data-dir={tmp_path / 'chromium'}", f"--screenshot={shot}",
         "--window-size=1200,2000", page.absolute().as_uri()],
        capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0 and shot.exists(), proc.stderr[-3000:]
    return shot


def test_report_draws_teacher_throughput_replicas_and_restarts(tmp_path: Path) -> None:
    from PIL import Image

    from raykd.report import load_run, write_report

    run = autoscaled_run(tmp_path / "auto")
    page, plots, text = write_report(run)
    assert list(plots) == ["loss", "eval_ppl", "throughput", "replicas"]
    html = page.read_text()
    check_self_contained(html)
    assert len(inlined_pngs(html)) == 4
    assert "<th>teacher tokens/s (median while labelling)</th><td>1,420</td>" in html
    assert "<th>teacher replicas (min – max)</th><td>1 – 3</td>" in html
    assert "<th>restarts</th><td>1</td>" in html
    assert text.startswith("auto: succeeded, 40 steps, 40,960 tokens in 2.5 min (1,110 tok/s")
    loaded = load_run(run)
    assert loaded.restarts() == [20]
    assert loaded.points("replicas", "elapsed")[0][0] == 11.0  # seconds since workers started
    for png in plots.values():
        with Image.open(png) as img:
            assert img.size == (800, 360)


def test_report_of_an_unfinished_run_and_a_torn_line(tmp_path: Path) -> None:
    from raykd.report import write_report

    run = autoscaled_run(tmp_path / "live", steps=6, restart_at=None, finished=False)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 8, "loss": 2.')  # the driver died mid-write
    page, plots, text = write_report(run)
    assert "eval_ppl" in plots  # the step-0 evaluation
    assert text.startswith("live: running or interrupted (no summary.json), 6 steps, 6,144 "
                           "tokens in — (940 tok/s median)")
    assert "<th>unreadable metrics lines</th><td>1</td>" in page.read_text()


def test_compare_prints_a_table_and_plots_every_run(real_run: Path, tmp_path: Path) -> None:
    from PIL import Image

    a = autoscaled_run(tmp_path / "a")
    b = autoscaled_run(tmp_path / "b", steps=20, restart_at=None, finished=False)
    out = tmp_path / "plots" / "cmp.png"
    proc = raykd("compare", str(real_run), str(a), str(b), "--out", str(out), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["run", "status", "steps", "wall", "tok/s", "student", "ppl",
                                "teacher", "ppl"]
    summary = json.loads((real_run / "summary.json").read_text())
    assert lines[1].split()[:3] == ["tiny", "succeeded", str(summary["steps"])]
    assert lines[1].split()[-1] == f"{summary['teacher_eval_ppl']:.1f}"
    assert lines[2].split() == ["a", "succeeded", "40", "150", "s", "1,110", "71.6", "42.0"]
    assert lines[3].split() == ["b", "unfinished", "20", "—", "1,010", "284.4", "—"]
    assert lines[4] == f"raykd: wrote {out}"
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == (800, 360)


@pytest.mark.parametrize("args, words", [
    (["report", "{tmp}/missing"], "missing: no such run directory"),
    (["report", "{tmp}"], "not a run directory (no metrics.jsonl or summary.json)"),
    (["compare", "{run}", "{tmp}"], "not a run directory"),
    (["compare", "{run}", "--out", "{tmp}/cmp.txt"], "--out: {tmp}/cmp.txt: Format 'txt'"),
])
def test_bad_report_input_is_one_line(tmp_path: Path, args: list[str], words: str) -> None:
    run = autoscaled_run(tmp_path / "r")
    def fill(text: str) -> str:
        return text.format(tmp=tmp_path, run=run)

    proc = raykd(*map(fill, args), timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("raykd: error: "), proc.stderr
    assert fill(words) in lines[0]
