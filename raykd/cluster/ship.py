"""What a submission carries: the project directory, minus heavy paths, plus the resolved job.

`raykd submit` resolves the job (file + overrides, every default filled in) on the laptop
and ships exactly that as `.raykd/job.yaml` inside the job's working directory, so the
cluster runs what was validated here, not a file that may differ there. The project (the
current directory) becomes the job's working directory: relative paths in the job mean the
same thing on the laptop and on the cluster.

Left out: EXCLUDE below, the job's own run.output_dir, and whatever the project's
`.gitignore` / `.rayignore` files exclude (read with Ray's own matcher, so the copy holds
what Ray would have uploaded from the project itself).
"""

from __future__ import annotations

import fnmatch
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from raykd.config import JobConfig, dump_yaml
from raykd.errors import UserError

SHIPPED_JOB = ".raykd/job.yaml"
MAX_BYTES = 500 * 2**20  # the Jobs API stores a working dir of at most 512 MiB

# Never worth uploading: environments, VCS data, caches, build output and run directories
# (checkpoints and exported models belong in train.storage, not in a job package).
EXCLUDE = (".git", ".hg", ".venv", "venv", ".tox", "__pycache__", "*.pyc", ".pytest_cache",
           ".mypy_cache", ".ruff_cache", "*.egg-info", "build", "dist", "node_modules",
           ".ipynb_checkpoints", "runs", ".raykd")

_log = logging.getLogger("raykd.ship")


def excluded(job: JobConfig) -> list[str]:
    """Name patterns left out anywhere in the tree, plus the job's relative output dir."""
    patterns = list(EXCLUDE)
    out = Path(job.run.output_dir)
    if not out.is_absolute() and out.parts and out.parts[0] not in ("..", "."):
        patterns.append(out.parts[0])
    return patterns


@contextmanager
def staged(job: JobConfig, job_file: str, project: Path) -> Iterator[Path]:
    """A temporary copy of `project` holding the resolved job at SHIPPED_JOB.

    Copying (rather than uploading `project` with excludes) keeps the resolved job out of
    the user's tree, so concurrent submits and read-only checkouts are fine.
    """
    project = project.resolve()
    patterns = excluded(job)
    matchers: dict[Path, list[Callable[[Path], bool]]] = {}
    size = 0

    def ignore(directory: str, names: list[str]) -> set[str]:
        here = Path(directory)
        # .gitignore / .rayignore apply to their directory and everything below it.
        matchers[here] = matchers.get(here.parent, []) + _ignore_files(here)
        return {n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)
                or any(m(here / n) for m in matchers[here])}

    def copy(src: str, dst: str) -> object:
        nonlocal size
        size += os.path.getsize(src)
        if size > MAX_BYTES:
            raise UserError(f"{project}: more than {MAX_BYTES // 2**20} MiB to ship with the job "
                            f"(at {Path(src).relative_to(project)}); submit from the project "
                            "directory, or list big paths in .rayignore")
        return shutil.copy2(src, dst)

    with tempfile.TemporaryDirectory(prefix="raykd-submit-") as tmp:
        root = Path(tmp) / project.name
        try:
            shutil.copytree(project, root, ignore=ignore, copy_function=copy, symlinks=True)
        except shutil.Error as e:  # copytree collects (src, dst, why) per failed file
            src, _, why = e.args[0][0]
            raise UserError(f"cannot package {project} for submission: {src}: {why}") from None
        except OSError as e:
            raise UserError(f"cannot package {project} for submission: {e}") from None
        (root / SHIPPED_JOB).parent.mkdir(parents=True, exist_ok=True)
        header = (f"# Resolved by `raykd submit` from {job_file}; every default is filled in.\n"
                  f"# raykd run {SHIPPED_JOB}\n")
        (root / SHIPPED_JOB).write_text(header + dump_yaml(job))
        yield root


def _ignore_files(directory: Path) -> list[Callable[[Path], bool]]:
    # Ray's reader of .gitignore/.rayignore, the code that decides what Ray itself zips
    # (ray is pinned, so this internal module is stable here).
    from ray._private.runtime_env.packaging import get_excludes_from_ignore_files

    include_gitignore = os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1"
    return get_excludes_from_ignore_files(directory, include_gitignore=include_gitignore,
                                          logger=_log)
