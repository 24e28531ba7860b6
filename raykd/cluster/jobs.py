"""The Ray Jobs API, as raykd uses it: submit a job file, then status, logs, stop, list.

    cluster = connect("http://127.0.0.1:8265")
    sid = submit(cluster, load_job("jobs/quickstart.yaml"), "jobs/quickstart.yaml")
    follow(cluster, sid, sys.stdout.write)

A submission id is derived from the run name (`raykd-<run.name>`), so submitting the same
run twice is refused by the Jobs API instead of starting a second copy. Every failure the
user can fix (no cluster, refused token, unknown job, duplicate run) is a UserError that
names the address or key; Ray's own exceptions never reach the user.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from raykd.cluster.auth import ADDRESS_VARS, Address, Token, find_token, refused, resolve_address
from raykd.cluster.ship import SHIPPED_JOB, staged
from raykd.config import JobConfig
from raykd.errors import UserError

PREFIX = "raykd-"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
T = TypeVar("T")


def submission_id(job: JobConfig) -> str:
    return f"{PREFIX}{job.run.name}"


@dataclass
class Cluster:
    """A connected Jobs API client plus what error messages need to name."""

    address: Address
    token: Token
    client: Any  # ray.job_submission.JobSubmissionClient

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run one client call, turning Ray's exceptions into one-line UserErrors."""
        from ray.exceptions import AuthenticationError

        # requests' errors are OSErrors; aiohttp's (the log stream) are not.
        lost: tuple[type[BaseException], ...] = (OSError, *_http_errors())
        try:
            return fn(*args, **kwargs)
        except AuthenticationError as e:
            raise refused(self.address, self.token, str(e)) from None
        except lost as e:
            raise UserError(f"{self.address.where}: lost the connection to the Ray Jobs API "
                            f"({_first_line(e)})") from None


def connect(address: str | None = None, timeout_s: float = 10.0) -> Cluster:
    """Resolve the address and token and open a client; fails fast and in one line."""
    addr = resolve_address(address)
    _probe(addr, timeout_s)
    token = find_token()
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    # The SDK prefers RAY_ADDRESS / RAY_API_SERVER_ADDRESS over the address it is given;
    # hide them so that --address means what it says.
    with _without_env(ADDRESS_VARS):
        try:
            client = JobSubmissionClient(addr.url, headers=token.headers())
        except AuthenticationError as e:
            raise refused(addr, token, str(e)) from None
        except OSError as e:  # refused, reset, TLS: the SDK's and requests' errors alike
            raise UserError(f"{addr.where}: cannot reach the Ray Jobs API "
                            f"({_first_line(e)})") from None
        except RuntimeError as e:  # e.g. a web server that is not a Ray dashboard
            raise UserError(f"{addr.where}: not a Ray Jobs API ({_first_line(e)})") from None
    return Cluster(address=addr, token=token, client=client)


def _probe(addr: Address, timeout_s: float) -> None:
    """A TCP connect with a timeout: the SDK has none, and a firewalled host would hang."""
    parts = urlsplit(addr.url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout_s):
            pass
    except OSError as e:
        why = "timed out" if isinstance(e, TimeoutError) else (e.strerror or str(e))
        raise UserError(f"{addr.where}: cannot reach the Ray Jobs API ({why})") from None


@contextlib.contextmanager
def _without_env(names: tuple[str, ...]) -> Iterator[None]:
    saved = {n: os.environ.pop(n) for n in names if n in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


# --------------------------------------------------------------------------- submit


def submit(cluster: Cluster, job: JobConfig, job_file: str, project: Path | None = None,
           agent_wait_s: float = 60.0) -> str:
    """Ship the project with the resolved job and start `raykd run` on the cluster."""
    sid = submission_id(job)
    existing = info(cluster, sid, missing_ok=True)
    if existing is not None:
        raise _duplicate(cluster, job, existing.status)
    project = project or Path.cwd()
    with staged(job, job_file, project) as workdir:
        runtime_env = {"working_dir": str(workdir),
                       # Unbuffered, so `raykd logs --follow` shows progress lines live.
                       "env_vars": {"PYTHONUNBUFFERED": "1"}}
        deadline = time.monotonic() + agent_wait_s
        while True:
            try:
                return cluster.call(
                    cluster.client.submit_job, entrypoint=f"raykd run {SHIPPED_JOB}",
                    submission_id=sid, runtime_env=runtime_env,
                    metadata={"raykd.run": job.run.name, "raykd.job_file": job_file})
            except (RuntimeError, ValueError) as e:
                text = str(e)
                if "already exists" in text:  # lost a race with another submit
                    raise _duplicate(cluster, job, "just submitted") from None
                # A freshly started head answers 500 until its job agent is up.
                if "No available agent" in text and time.monotonic() < deadline:
                    time.sleep(1.0)
                    continue
                raise UserError(f"{cluster.address.where}: submitting {sid} failed: "
                                f"{_first_line(e)}") from None


def _duplicate(cluster: Cluster, job: JobConfig, status: Any) -> UserError:
    sid = submission_id(job)
    hint = f"choose another run.name, e.g. run.name={job.run.name}-2"
    if str(status) in ("FAILED", "STOPPED"):
        # The same run name is how a crashed run continues (Ray Train finds its state by
        # name), so say how, instead of only pointing at a new name.
        hint = (f"to continue it, `ray job delete {sid} --address {cluster.address.url}` and "
                f"submit again with run.resume=true; or {hint}")
    return UserError(f"run.name: job {sid} already exists on {cluster.address.where} "
                     f"({status}); {hint}")


# --------------------------------------------------------------------------- watch


def info(cluster: Cluster, sid: str, missing_ok: bool = False) -> Any:
    """The job's JobDetails; None (missing_ok) or a UserError when there is no such job."""
    try:
        return cluster.call(cluster.client.get_job_info, sid)
    except RuntimeError as e:
        if "status code 404" in str(e) or "does not exist" in str(e):
            if missing_ok:
                return None
            raise UserError(f"{sid}: no such job on {cluster.address.where} "
                            "(`raykd list` shows the jobs there)") from None
        raise UserError(f"{cluster.address.where}: {_first_line(e)}") from None


def logs(cluster: Cluster, sid: str) -> str:
    info(cluster, sid)
    return cluster.call(cluster.client.get_job_logs, sid)


def follow(cluster: Cluster, sid: str, write: Callable[[str], Any]) -> str:
    """Stream the job's logs until it ends; returns its final status."""
    info(cluster, sid)

    async def tail() -> None:
        async for chunk in cluster.client.tail_job_logs(sid):
            write(chunk)

    try:
        cluster.call(asyncio.run, tail())
    except RuntimeError as e:  # the stream broke off (head restarted, network)
        raise UserError(f"{cluster.address.where}: log stream of {sid} broke off: "
                        f"{_first_line(e)}") from None
    return wait(cluster, sid, timeout_s=30.0)


def wait(cluster: Cluster, sid: str, timeout_s: float) -> str:
    """The job's status once terminal, or its current status after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = str(info(cluster, sid).status)
        if status in TERMINAL or time.monotonic() >= deadline:
            return status
        time.sleep(0.5)


def stop(cluster: Cluster, sid: str, timeout_s: float = 60.0) -> str:
    """Ask the job to stop and wait until it has; returns the final status."""
    info(cluster, sid)
    cluster.call(cluster.client.stop_job, sid)
    return wait(cluster, sid, timeout_s)


def jobs(cluster: Cluster) -> list[Any]:
    """All jobs on the cluster, oldest first."""
    found = cluster.call(cluster.client.list_jobs)
    return sorted(found, key=lambda d: d.start_time or 0)


def _http_errors() -> tuple[type[BaseException], ...]:
    try:
        import aiohttp
    except ImportError:  # pragma: no cover - ray[default] brings it
        return ()
    return (aiohttp.ClientError,)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0].rstrip(".") if text else type(e).__name__
