"""What a submission carries: the project directory, minus heavy paths, plus the resolved job.

`raykd submit` resolves the job (file + overrides, every default filled in) on the laptop
and ships exactly that as `.raykd/job.yaml` inside the job's working directory, so the
cluster runs what `raykd validate` checked, not a file that may differ on the cluster.
The project (the current directory) becomes the job's working directory: relative paths
in the job mean the same thing on the laptop and on the cluster. Ray also applies the
project's `.gitignore` and `.rayignore` when it packages the copy.
"""

from __future__ import annotations

import fnmatch
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from raykd.config import JobConfig, dump_yaml
from raykd.errors import UserError

SHIPPED_JOB = ".raykd/job.yaml"

# Never worth uploading: environments, VCS data, caches, build output and run directories
# (checkpoints and exported models belong in train.storage, not in a job package).
EXCLUDE = (".git", ".hg", ".venv", "venv", ".tox", "__pycache__", "*.pyc", ".pytest_cache",
           ".mypy_cache", ".ruff_cache", "*.egg-info", "build", "dist", "node_modules",
           ".ipynb_checkpoints", "runs", ".raykd")


def excluded(project: Path, job: JobConfig) -> list[str]:
    """Glob patterns on names, plus the job's own run.output_dir when it is in the project."""
    patterns = list(EXCLUDE)
    out = Path(job.run.output_dir)
    if not out.is_absolute() and out.parts and out.parts[0] not in ("..", "."):
        patterns.append(out.parts[0])
    return patterns


@contextmanager
def staged(job: JobConfig, job_file: str, project: Path) -> Iterator[Path]:
    """A temporary copy of `project` holding the resolved job at SHIPPED_JOB.

    Copying (instead of uploading `project` with Ray's excludes) keeps the resolved job out
    of the user's tree and makes what is shipped easy to inspect and test.
    """
    project = project.resolve()
    patterns = excluded(project, job)

    def ignore(directory: str, names: list[str]) -> set[str]:
        return {n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)}

    with tempfile.TemporaryDirectory(prefix="raykd-submit-") as tmp:
        root = Path(tmp) / project.name
        try:
            shutil.copytree(project, root, ignore=ignore, symlinks=True)
        except (OSError, shutil.Error) as e:
            raise UserError(f"cannot package {project} for submission: {e}") from None
        (root / SHIPPED_JOB).parent.mkdir(parents=True, exist_ok=True)
        header = (f"# Resolved by `raykd submit` from {job_file}; every default is filled in.\n"
                  f"# raykd run {SHIPPED_JOB}\n")
        (root / SHIPPED_JOB).write_text(header + dump_yaml(job))
        yield root
