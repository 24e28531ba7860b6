"""`raykd` command line: run and validate distillation jobs, locally or on a cluster.

    raykd validate jobs/quickstart.yaml train.lr=1e-3
    raykd run jobs/quickstart.yaml run.name=try2
    raykd resume runs/try2                       # after a crash or a lost driver
    raykd label jobs/quickstart.yaml             # teacher only: fill the label cache
    raykd submit jobs/quickstart.yaml --address http://HEAD:8265   # then status/logs/stop/list
    raykd render-k8s jobs/smollm2-gpu.yaml --image REGISTRY/raykd:0.1.0 > rayjob.yaml
    raykd report runs/try2                       # report.html + plots in the run directory
    raykd compare runs/try1 runs/try2 --out compare.png

New features become job-file keys, not flags: every `key.sub=value` after the job file
overrides the file.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence

from raykd.errors import UserError


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="raykd", description="Distill a teacher LM into a "
                                     "student on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help in (("run", "run a job (embedded Ray unless run.ray_address is set)"),
                       ("validate", "check a job file without starting Ray"),
                       ("label", "run the teacher alone and fill the label cache"),
                       ("submit", "submit a job to a cluster's Ray Jobs API; prints its id"),
                       ("render-k8s", "print a KubeRay RayJob sized for the job")):
        p = sub.add_parser(name, help=help)
        p.add_argument("job", help="job file (YAML)")
        p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
        if name in ("run", "label"):
            _progress(p)
        if name == "submit":
            _address(p)
        if name == "render-k8s":
            p.add_argument("--image", help="container image with raykd and the project "
                           "(default: $RAYKD_IMAGE, else a placeholder to edit)")
    for name, help in (("status", "show a submitted job's state"),
                       ("logs", "print a submitted job's logs"),
                       ("stop", "stop a submitted job and wait until it has stopped")):
        p = sub.add_parser(name, help=help)
        p.add_argument("id", help="submission id (raykd-<run.name>)")
        _address(p)
        if name == "logs":
            p.add_argument("--follow", action="store_true",
                           help="stream until the job ends; exit 0 only if it SUCCEEDED")
    _address(sub.add_parser("list", help="list the jobs on a cluster"))
    p = sub.add_parser("resume", help="continue a run from its latest complete checkpoint")
    p.add_argument("run_dir", help="the run directory (holds job.yaml)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides (run.* only)")
    _progress(p)
    p = sub.add_parser("report", help="plot a run's metrics; writes report.html and PNGs "
                       "into the run directory")
    p.add_argument("run_dir", help="the run directory (holds metrics.jsonl)")
    p = sub.add_parser("compare", help="print a table of runs' summaries and plot their eval "
                       "perplexity")
    p.add_argument("run_dirs", nargs="+", metavar="run_dir", help="run directories")
    p.add_argument("--out", default="compare.png", help="the plot's path (default: %(default)s)")
    args, extra = parser.parse_known_args(argv)
    # Overrides may follow options (`submit JOB --address URL a.b=c`); argparse would
    # reject the ones after an option.
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-")
                                                    for e in extra):
        args.overrides.extend(extra)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        print("raykd: interrupted", file=sys.stderr)
        return 130
    except BaseException as e:  # noqa: BLE001 - user errors may arrive wrapped by Ray
        user = find_user_error(e)
        if user is None:
            raise
        print(f"raykd: error: {user}", file=sys.stderr)
        return UserError.exit_code


def _progress(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("-q", "--quiet", action="store_true",
                   help="print only the outcome (run.progress=quiet)")
    g.add_argument("--plain", action="store_true",
                   help="one progress line per report, no redrawing, e.g. for logs "
                   "(run.progress=plain)")


def _address(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="the cluster's Jobs API, http://HEAD:8265 (default: "
                   "$RAY_API_SERVER_ADDRESS, then $RAY_ADDRESS)")


def _dispatch(args: argparse.Namespace) -> int:
    from raykd.config import load_job

    if args.command in ("report", "compare"):
        return _report(args)
    if args.command not in ("run", "validate", "label", "resume"):
        from raykd.cluster.commands import HANDLERS

        return HANDLERS[args.command](args)
    overrides = list(args.overrides)
    if getattr(args, "quiet", False) or getattr(args, "plain", False):
        overrides.append(f"run.progress={'quiet' if args.quiet else 'plain'}")
    if args.command == "resume":
        job = _resumed_job(args.run_dir, overrides)
    else:
        job = load_job(args.job, overrides)
    quiet = job.run.progress == "quiet"

    def log(line: str) -> None:
        if not quiet:
            print(line, flush=True)

    if args.command == "validate":
        from raykd.preflight import preflight
        from raykd.student.optim import describe_zero

        checks = preflight(job)
        print(f"raykd: {args.job} is valid: {len(checks.files.paths)} data file(s), teacher "
              f"{checks.teacher.model_type} with {checks.teacher.num_layers} layers and "
              f"{checks.teacher.vocab_size} tokens, student {job.student.num_layers} layers, "
              f"{job.train.num_workers} worker(s) x {describe_zero(job.train)}")
        return 0
    if args.command in ("run", "resume"):
        from raykd.runner import run

        outcome = run(job, log=log)
        print(f"raykd: run directory {outcome.run_dir}")
        print(json.dumps(outcome.summary, indent=2))
        return 0 if outcome.summary.get("status") == "succeeded" else 1
    if args.command == "label":
        from raykd.runner import label_only

        out = label_only(job, log=log)
        print(json.dumps(out, indent=2))
        return 0 if out["status"] == "succeeded" else 1
    raise AssertionError(args.command)


def _report(args: argparse.Namespace) -> int:
    from raykd import report

    if args.command == "report":
        page, plots, text = report.write_report(args.run_dir)
        print(text)
        print(f"raykd: wrote {page} ({len(plots)} plots: "
              f"{', '.join(p.name for p in plots.values()) or 'none'})")
        return 0
    table, plot = report.compare(args.run_dirs, args.out)
    print(table)
    print(f"raykd: wrote {plot}")
    return 0


def _resumed_job(run_dir: str, overrides: list[str]):  # noqa: ANN202
    """The run's own job.yaml, pointed at wherever the run directory now is."""
    from pathlib import Path

    from raykd.config import load_job

    path = Path(run_dir)
    if not (path / "job.yaml").exists():
        raise UserError(f"{run_dir}: not a run directory (no job.yaml)")
    return load_job(path / "job.yaml", [f"run.output_dir={path.parent}", f"run.name={path.name}",
                                        "run.resume=true", *overrides])


def find_user_error(e: BaseException) -> UserError | None:
    """The UserError behind `e`, also when a Ray task or actor raised it remotely."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [e]
    while stack:
        cur = stack.pop()
        if cur is None or id(cur) in seen:
            continue
        seen.add(id(cur))
        if isinstance(cur, UserError):
            # Ray re-raises remote errors as a subclass of both RayTaskError and the cause;
            # its str() carries the remote traceback, the cause's args carry our one line.
            cause = getattr(cur, "cause", None)
            if isinstance(cause, UserError):
                return cause
            return UserError(cur.args[0]) if cur.args else cur
        stack.extend([getattr(cur, "cause", None), cur.__cause__, cur.__context__])
    # Ray Data re-raises a UDF's exception as UserCodeException without its cause; only the
    # remote traceback text still carries our one-line message.
    match = _REMOTE_USER_ERROR.search(str(e))
    return UserError(match.group(1).strip()) if match else None


_REMOTE_USER_ERROR = re.compile(r"raykd\.errors\.(?:UserError|ConfigError): ([^\n]+)")


if __name__ == "__main__":
    sys.exit(main())
