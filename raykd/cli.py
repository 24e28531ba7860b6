"""`raykd` command line: run and validate distillation jobs.

    raykd validate jobs/quickstart.yaml train.lr=1e-3
    raykd run jobs/quickstart.yaml run.name=try2

New features become job-file keys, not flags: every `key.sub=value` after the job file
overrides the file.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Sequence

from raykd.errors import UserError


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="raykd", description="Distill a teacher LM into a "
                                     "student on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help in (("run", "run a job (embedded Ray unless run.ray_address is set)"),
                       ("validate", "check a job file without starting Ray")):
        p = sub.add_parser(name, help=help)
        p.add_argument("job", help="job file (YAML)")
        p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = parser.parse_args(argv)
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


def _dispatch(args: argparse.Namespace) -> int:
    from raykd.config import load_job

    job = load_job(args.job, args.overrides)
    if args.command == "validate":
        from raykd.preflight import preflight

        checks = preflight(job)
        print(f"raykd: {args.job} is valid: {len(checks.files.paths)} data file(s), teacher "
              f"{checks.teacher.model_type} with {checks.teacher.num_layers} layers and "
              f"{checks.teacher.vocab_size} tokens, student {job.student.num_layers} layers, "
              f"{job.train.num_workers} worker(s) x ZeRO-{job.train.zero_stage}")
        return 0
    if args.command == "run":
        from raykd.runner import run

        outcome = run(job, log=lambda line: print(line, flush=True))
        print(f"raykd: run directory {outcome.run_dir}")
        print(json.dumps(outcome.summary, indent=2))
        return 0 if outcome.summary.get("status") == "succeeded" else 1
    raise AssertionError(args.command)


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
