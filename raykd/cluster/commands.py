"""The cluster subcommands of `raykd`: submit, status, logs, stop, list, render-k8s.

cli.py parses; this module prints. Submission ids go to stdout alone (so
`SID=$(raykd submit ...)` works); hints and final states go to stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from raykd.cluster import jobs
from raykd.config import load_job


def submit(args: argparse.Namespace) -> int:
    job = load_job(args.job, args.overrides)  # a bad job fails here, before any network
    cluster = jobs.connect(args.address)
    sid = jobs.submit(cluster, job, args.job)
    print(sid, flush=True)
    print(f"raykd: submitted to {cluster.address.url}; follow with: raykd logs {sid} --follow "
          f"--address {cluster.address.url}", file=sys.stderr)
    return 0


def status(args: argparse.Namespace) -> int:
    details = jobs.info(jobs.connect(args.address), args.id)
    message = (details.message or "").strip().splitlines()
    print(f"{args.id}: {details.status}" + (f" ({message[0][:200]})" if message else ""))
    return 0


def logs(args: argparse.Namespace) -> int:
    cluster = jobs.connect(args.address)
    if not args.follow:
        sys.stdout.write(jobs.logs(cluster, args.id))
        return 0

    def write(chunk: str) -> None:
        sys.stdout.write(chunk)
        sys.stdout.flush()

    final = jobs.follow(cluster, args.id, write)
    print(f"raykd: {args.id} {final}", file=sys.stderr)
    return 0 if final == "SUCCEEDED" else 1


def stop(args: argparse.Namespace) -> int:
    final = jobs.stop(jobs.connect(args.address), args.id)
    print(f"{args.id}: {final}")
    return 0 if final in jobs.TERMINAL else 1


def list_jobs(args: argparse.Namespace) -> int:
    found = jobs.jobs(jobs.connect(args.address))
    rows = [("SUBMISSION_ID", "STATUS", "STARTED", "JOB")]
    for d in found:
        started = (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(d.start_time / 1000))
                   if d.start_time else "-")
        # raykd's own submissions all run `raykd run .raykd/job.yaml`; name their job file.
        what = (d.metadata or {}).get("raykd.job_file") or d.entrypoint or ""
        rows.append((d.submission_id or d.job_id or "-", str(d.status), started, what[:80]))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=False)) + "  " + r[3])
    return 0


def render_k8s(args: argparse.Namespace) -> int:
    from raykd.cluster import k8s

    job = load_job(args.job, args.overrides)
    job_file = _as_in_image(args.job)
    image = args.image or os.environ.get("RAYKD_IMAGE") or k8s.PLACEHOLDER_IMAGE
    notes = [f"# raykd render-k8s {' '.join([args.job, *args.overrides])}",
             "# kubectl apply -f <this file>; `raykd status/logs <jobId>` via the head service.",
             f"# The image must hold the project with {job_file} (see cluster/Dockerfile)."]
    if image == k8s.PLACEHOLDER_IMAGE:
        notes.append(f"# {k8s.PLACEHOLDER_IMAGE} is a placeholder: pass --image or edit it.")
    if not job.teacher.node_labels and not job.teacher.resources:
        notes.append("# teacher.node_labels/resources are empty: replicas may land on any "
                     "worker pod.")
    if not job.train.node_labels and not job.train.resources:
        notes.append("# train.node_labels/resources are empty: workers may land on any "
                     "worker pod.")
    manifest = k8s.ray_job(job, job_file, list(args.overrides), image)
    sys.stdout.write(k8s.to_yaml(manifest, "\n".join(notes) + "\n"))
    return 0


def _as_in_image(job_file: str) -> str:
    """The job file relative to the project (the image's working directory) when it lies
    inside the current directory; otherwise as given."""
    path = Path(job_file)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return job_file


HANDLERS = {"submit": submit, "status": status, "logs": logs, "stop": stop,
            "list": list_jobs, "render-k8s": render_k8s}
