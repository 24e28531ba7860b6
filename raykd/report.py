"""Reports on run directories: PNG plots, a self-contained report.html, and comparisons.

    raykd report runs/quickstart                  # report.html + *.png inside the run dir
    raykd compare runs/a runs/b --out compare.png   # a table on stdout, one plot

Plain Python over the files a run leaves (metrics.jsonl, summary.json, events.jsonl,
job.yaml), so it works on a finished run, a failed one, or one still training. No Ray.
Plots use matplotlib's Agg canvas directly (no pyplot state, no display needed).
"""

from __future__ import annotations

import base64
import html
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raykd.errors import UserError

REPORT = "report.html"
# Plot files, in page order; a plot whose columns a run lacks is not drawn.
PLOTS = {"loss": "Training loss", "eval_ppl": "Eval perplexity",
         "throughput": "Throughput", "replicas": "Teacher replicas"}


@dataclass
class Run:
    """What a run directory holds, read once."""

    path: Path
    metrics: list[dict[str, Any]]
    summary: dict[str, Any]  # {} while the run is still going (or its driver died)
    events: list[dict[str, Any]] = field(default_factory=list)
    job_yaml: str = ""
    skipped_lines: int = 0  # unreadable metrics lines (a write cut short by a crash)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def status(self) -> str:
        return str(self.summary.get("status", "running or interrupted (no summary.json)"))

    def points(self, column: str, x: str = "step") -> tuple[list[float], list[float]]:
        """(x, y) of every row with a finite `column`; x="elapsed" is seconds since start."""
        xs, ys = [], []
        for row in self.metrics:
            y = row.get(column)
            if isinstance(y, (int, float)) and math.isfinite(y):
                xs.append(float(row.get("time", 0.0)) - self.t0 if x == "elapsed"
                          else float(row.get(x, 0)))
                ys.append(float(y))
        return xs, ys

    @property
    def t0(self) -> float:
        """When the run's workers first started (else its first report)."""
        times = [float(e["time"]) for e in self.events if "time" in e]
        times += [float(r["time"]) for r in self.metrics[:1] if "time" in r]
        return min(times, default=0.0)

    def evals(self) -> tuple[list[float], list[float]]:
        """Eval perplexity by step, one point per step (the final report repeats the last)."""
        by_step = dict(zip(*self.points("eval_ppl")))
        return list(by_step), list(by_step.values())

    def last(self, column: str) -> Any:
        """The latest reported value of `column` (what an unfinished run has reached)."""
        return next((r[column] for r in reversed(self.metrics) if column in r), None)

    def median_tokens_per_s(self) -> float | None:
        _, ys = self.points("tokens_per_s")
        return statistics.median(ys) if ys else None

    def restarts(self) -> list[int]:
        """The step each worker-group restart resumed from."""
        starts = [e for e in self.events if e.get("event") == "workers_start"]
        return [int(e.get("resume_step", 0)) for e in starts[1:]]


def load_run(path: str | Path) -> Run:
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"{path}: no such run directory")
    if not (p / "metrics.jsonl").exists() and not (p / "summary.json").exists():
        raise UserError(f"{path}: not a run directory (no metrics.jsonl or summary.json)")
    metrics, skipped = _read_jsonl(p / "metrics.jsonl")
    events, _ = _read_jsonl(p / "events.jsonl")
    summary: dict[str, Any] = {}
    if (p / "summary.json").exists():
        try:
            summary = json.loads((p / "summary.json").read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{p / 'summary.json'}: not JSON ({e.msg})") from None
    job = (p / "job.yaml").read_text() if (p / "job.yaml").exists() else ""
    return Run(p, metrics, summary, events, job, skipped)


def _read_jsonl(path: Path) -> tuple[list[dict[str, Any]], int]:
    rows, skipped = [], 0
    if not path.exists():
        return rows, 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            skipped += 1
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows, skipped


# --------------------------------------------------------------------------- plots


def _figure(title: str, xlabel: str, ylabel: str) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(True, alpha=0.3)
    if xlabel == "step":
        ax.xaxis.get_major_locator().set_params(integer=True)
    return fig, ax


def plot_run(run: Run, out_dir: Path) -> dict[str, Path]:
    """Draw every plot the run has data for into out_dir; -> {plot name: PNG path}."""
    drawn = {}
    for name in PLOTS:
        fig = globals()[f"_plot_{name}"](run)
        if fig is not None:
            drawn[name] = out_dir / f"{name}.png"
            fig.savefig(drawn[name])
    return drawn


def _plot_loss(run: Run) -> Any:
    series = {c: run.points(c) for c in ("loss", "kd_loss", "ce_loss")}
    if not any(xs for xs, _ in series.values()):
        return None
    fig, ax = _figure(f"{run.name}: training loss", "step", "loss")
    for column, (xs, ys) in series.items():
        if xs:
            ax.plot(xs, ys, marker=".", label=column)
    for i, step in enumerate(run.restarts()):
        ax.axvline(step, color="grey", linestyle=":", label="restart" if i == 0 else None)
    ax.legend()
    return fig


def _plot_eval_ppl(run: Run) -> Any:
    xs, ys = run.evals()
    if not xs:
        return None
    fig, ax = _figure(f"{run.name}: held-out perplexity", "step", "perplexity (log scale)")
    ax.plot(xs, ys, marker="o", label="student")
    teacher = run.summary.get("teacher_eval_ppl")
    if isinstance(teacher, (int, float)):
        ax.axhline(teacher, color="tab:red", linestyle="--", label=f"teacher ({teacher:.1f})")
    ax.set_yscale("log")
    ax.legend()
    return fig


def _plot_throughput(run: Run) -> Any:
    series = {label: run.points(c, "elapsed") for c, label in
              (("tokens_per_s", "student tokens/s"), ("teacher_tokens_per_s", "teacher tokens/s"))}
    if not any(xs for xs, _ in series.values()):
        return None
    fig, ax = _figure(f"{run.name}: throughput", "seconds since the workers started",
                      "tokens / s")
    for label, (xs, ys) in series.items():
        if xs:
            ax.plot(xs, ys, marker=".", label=label)
    ax.set_ylim(bottom=0)
    ax.legend()
    return fig


def _plot_replicas(run: Run) -> Any:
    xs, ys = run.points("replicas", "elapsed")
    if not xs:
        return None
    fig, ax = _figure(f"{run.name}: teacher replicas", "seconds since the workers started",
                      "replicas")
    ax.plot(xs, ys, drawstyle="steps-post", marker=".")
    ax.set_ylim(bottom=0, top=max(ys) + 1)
    ax.yaxis.get_major_locator().set_params(integer=True)
    return fig


# --------------------------------------------------------------------------- one run


def summary_rows(run: Run) -> list[tuple[str, str]]:
    s = run.summary
    losses = run.points("loss")[1]
    ppl = run.evals()[1]
    teacher_tps = run.points("teacher_tokens_per_s")[1]
    replicas = run.points("replicas")[1]
    rows = [("status", run.status),
            ("steps", _num(s.get("steps", run.last("step")))),
            ("tokens", _num(s.get("tokens", run.last("tokens")))),
            ("wall time", _secs(s.get("wall_s"))),
            ("student tokens/s (median)", _num(run.median_tokens_per_s()))]
    if teacher_tps:  # only where the run's raykd records the teacher's side
        # While it labelled: a pool that finished its epoch (or a cache that served every
        # row) reports 0, which says nothing about its speed.
        busy = [t for t in teacher_tps if t > 0]
        rows.append(("teacher tokens/s (median while labelling)",
                     _num(statistics.median(busy)) if busy else "— (nothing labelled)"))
    if replicas:
        rows.append(("teacher replicas (min – max)", f"{min(replicas):.0f} – {max(replicas):.0f}"))
    rows += [("loss (first → last)", f"{losses[0]:.3f} → {losses[-1]:.3f}" if losses else "—"),
             ("student eval ppl (start → end)",
              f"{ppl[0]:,.1f} → {ppl[-1]:,.1f}" if ppl else "—"),
             ("teacher eval ppl", _num(s.get("teacher_eval_ppl"), ",.1f")),
             ("restarts", str(len(run.restarts()))),
             ("student export", str(s.get("export_dir") or "—"))]
    if run.skipped_lines:
        rows.append(("unreadable metrics lines", str(run.skipped_lines)))
    return rows


def text_summary(run: Run) -> str:
    rows = dict(summary_rows(run))
    return (f"{run.name}: {rows['status']}, {rows['steps']} steps, {rows['tokens']} tokens in "
            f"{rows['wall time']} ({rows['student tokens/s (median)']} tok/s median)\n"
            f"  eval ppl: student {rows['student eval ppl (start → end)']}, teacher "
            f"{rows['teacher eval ppl']}; loss {rows['loss (first → last)']}")


def write_report(run_dir: str | Path) -> tuple[Path, dict[str, Path], str]:
    """report.html and the PNGs into the run directory; -> (page, plots, text summary)."""
    run = load_run(run_dir)
    page = run.path / REPORT
    try:
        plots = plot_run(run, run.path)
        page.write_text(render_html(run, plots))
    except OSError as e:  # a read-only or full run directory
        raise UserError(f"{run.path}: cannot write the report: {e.strerror or e}") from None
    return page, plots, text_summary(run)


def render_html(run: Run, plots: dict[str, Path]) -> str:
    """One file, no external CSS, JS or images: the PNGs are inlined as base64."""
    e = html.escape
    table = "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in summary_rows(run))
    sections = []
    for name, title in PLOTS.items():
        if name in plots:
            data = base64.b64encode(plots[name].read_bytes()).decode()
            body = f'<img alt="{e(title)}" src="data:image/png;base64,{data}">'
        else:
            body = f'<p class="none">{e(_MISSING[name])}</p>'
        sections.append(f'<section id="{name}"><h2>{e(title)}</h2>{body}</section>')
    job = (f'<section id="job"><h2>Job</h2><pre>{e(run.job_yaml)}</pre></section>'
           if run.job_yaml else "")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>raykd report: {e(run.name)}</title>
<style>
body {{ font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 860px;
       color: #222; }}
h1 {{ font-size: 1.5em; }} h2 {{ font-size: 1.15em; margin-top: 1.6em; }}
table {{ border-collapse: collapse; }} th, td {{ padding: .25em .8em; text-align: left;
       border-bottom: 1px solid #ddd; }} th {{ font-weight: 600; color: #555; }}
img {{ max-width: 100%; border: 1px solid #eee; }} .none {{ color: #777; }}
pre {{ background: #f6f6f6; padding: 1em; overflow-x: auto; font-size: 13px; }}
</style></head>
<body>
<h1>raykd run <code>{e(run.name)}</code></h1>
<p>{e(str(run.path.absolute()))}</p>
<section id="summary"><h2>Summary</h2><table>{table}</table></section>
{"".join(sections)}
{job}
</body></html>
"""


_MISSING = {
    "loss": "No training step reported yet (no loss in metrics.jsonl).",
    "eval_ppl": "No evaluation reported yet (no eval_ppl in metrics.jsonl).",
    "throughput": "No throughput reported yet (no tokens_per_s in metrics.jsonl).",
    "replicas": "The teacher pool size was not recorded (no replicas column in metrics.jsonl).",
}


def _num(value: Any, fmt: str = ",.0f") -> str:
    """`value` formatted by `fmt` ("<spec>[ unit]"), or a dash where it is missing."""
    spec, _, unit = fmt.partition(" ")
    if not isinstance(value, (int, float)):
        return "—"
    return format(value, spec) + (f" {unit}" if unit else "")


def _secs(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "—"
    return f"{value:.0f} s" if value < 120 else f"{value / 60:.1f} min"


# --------------------------------------------------------------------------- many runs


def compare(run_dirs: list[str], out: str | Path) -> tuple[str, Path]:
    """A table of the runs' summaries, and eval perplexity of each vs step plotted to `out`
    (a directory gets compare.png); -> (table, plot path)."""
    runs = [load_run(d) for d in run_dirs]
    names = [r.name for r in runs]
    if len(set(names)) < len(names):  # same run name in different output dirs
        names = [str(r.path) for r in runs]
    header = ("run", "status", "steps", "wall", "tok/s", "student ppl", "teacher ppl")
    # tok/s is the median of the student's reports; ppl the last held-out evaluation.
    rows = [header]
    for name, run in zip(names, runs):
        s, ppl = run.summary, run.evals()[1]
        rows.append((name, run.status if run.summary else "unfinished",
                     _num(s.get("steps", run.last("step"))), _num(s.get("wall_s"), ",.0f s"),
                     _num(run.median_tokens_per_s()), _num(ppl[-1] if ppl else None, ".1f"),
                     _num(s.get("teacher_eval_ppl"), ".1f")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(r, widths))) for r in rows]

    fig, ax = _figure("held-out perplexity: students (solid), teachers (dashed)", "step",
                      "perplexity (log scale)")
    for name, run in zip(names, runs):
        xs, ys = run.evals()
        if not xs:
            continue
        line, = ax.plot(xs, ys, marker="o", label=name)
        teacher = run.summary.get("teacher_eval_ppl")
        if isinstance(teacher, (int, float)):
            ax.axhline(teacher, color=line.get_color(), linestyle="--", linewidth=1,
                       label=f"{name} teacher")
    ax.set_yscale("log")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    out = Path(out)
    if out.is_dir():
        out = out / "compare.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(out)
    except ValueError as e:  # an extension matplotlib cannot write
        raise UserError(f"--out: {out}: {e}") from None
    return "\n".join(lines), out
