"""`raykd submit | status | logs | stop | list` against a real Ray head with token auth.

The head is `ray start --head --block` on 127.0.0.1 with its own ports, temp dir and HOME,
and RAY_AUTH_MODE=token: every Jobs API call needs the token, so every test here also
shows that raykd sends it (from ~/.ray/auth_token or RAY_AUTH_TOKEN, without the client
setting RAY_AUTH_MODE). The head is stopped by terminating that one process, never with
`ray stop`, and whatever it started and left behind is killed by PID.

The tests without the `ray` mark need no cluster (address and token resolution, and what a
submission ships).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from raykd.cluster import auth, ship
from raykd.config import job_from_dict
from raykd.errors import UserError
from tests.ports import free_ports
from tests.tiny import make_llama, shakespeare

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# Variables that would let the developer's own Ray setup leak into a test.
RAY_VARS = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN",
            "RAY_AUTH_TOKEN_PATH")


def _clean_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in RAY_VARS}
    env.update(HOME=str(home), PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


class Head:
    """A token-auth Ray head in its own process group, and a way to talk to it."""

    def __init__(self, root: Path):
        self.token = secrets.token_hex(24)
        self.home = root / "head-home"
        self.temp = root / "ray"
        self.home.mkdir()
        self.temp.mkdir()
        # Other Ray instances on this machine hold Ray's default ports; take free ones.
        flags = ("--port", "--dashboard-port", "--node-manager-port", "--object-manager-port",
                 "--ray-client-server-port", "--dashboard-agent-listen-port",
                 "--dashboard-agent-grpc-port", "--runtime-env-agent-port",
                 "--metrics-export-port")
        ports = dict(zip(flags, free_ports(len(flags))))
        self.dashboard_port = ports["--dashboard-port"]
        self.url = f"http://127.0.0.1:{self.dashboard_port}"
        cmd = [str(BIN / "ray"), "start", "--head", "--block", "--dashboard-host", "127.0.0.1",
               "--temp-dir", str(self.temp), "--num-cpus", "4", "--include-dashboard", "true",
               "--disable-usage-stats"]
        for flag, port in ports.items():
            cmd += [flag, str(port)]
        self.log = open(root / "head.log", "w")  # noqa: SIM115 - closed by stop()
        # 4 logical CPUs on 2 cores: a teacher replica, a Train worker and Ray Data tasks.
        self.proc = subprocess.Popen(
            cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
            env=_clean_env(self.home, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token,
                           # A test head need not drain for Ray's default 30 s on SIGTERM.
                           RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="2"))

    def wait_ready(self, timeout_s: float = 90) -> None:
        import requests

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.temp.parent / "head.log").read_text()[-3000:]
            try:
                r = requests.get(f"{self.url}/api/version", timeout=2,
                                 headers={"Authorization": f"Bearer {self.token}"})
                if r.status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"Ray head at {self.url} did not come up")

    def stop(self) -> None:
        import psutil

        try:
            started = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            started = []
        # SIGTERM to `ray start --block` alone: it drains and stops what it started.
        # (Signalling the whole group at once kills the GCS first and stalls the drain.)
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        gone, alive = psutil.wait_procs(started, timeout=20)
        for p in alive:  # only processes this head started
            p.kill()
        psutil.wait_procs(alive, timeout=10)
        self.log.close()


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    h = Head(tmp_path_factory.mktemp("head"))
    try:
        h.wait_ready()
        yield h
    finally:
        h.stop()
    # Nothing this head started (GCS, raylet, dashboard, job drivers) outlives it.
    assert _processes_using(h.temp) == []


def _processes_using(path: Path) -> list[str]:
    import psutil

    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if str(path) in cmd:
            found.append(f"{p.info['pid']}: {cmd[:120]}")
    return found


@pytest.fixture(scope="module")
def client_home(head, tmp_path_factory) -> Path:
    """A client HOME whose ~/.ray/auth_token is the cluster's token."""
    home = tmp_path_factory.mktemp("client-home")
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text(head.token + "\n")
    return home


def raykd(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    # cwd is the project: `raykd submit` ships the current directory as the working dir.
    return subprocess.run([str(BIN / "raykd"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


@pytest.fixture(scope="module")
def tiny_job(tmp_path_factory) -> Path:
    """A real raykd job, small enough for the Jobs runtime on 2 cores."""
    base = tmp_path_factory.mktemp("tiny-job")
    teacher = make_llama(base / "teacher", layers=2)
    job = {
        "run": {"name": "tiny", "output_dir": str(base / "runs")},
        "data": {"source": [shakespeare("phoenix_and_the_turtle"),
                            shakespeare("lovers_complaint")],
                 "seq_len": 64, "eval_fraction": 0.05, "eval_max_samples": 8},
        "teacher": {"model": str(teacher), "batch_size": 4, "num_cpus": 1},
        "labels": {"top_k": 8},
        "student": {"num_layers": 1, "hidden_size": 32, "intermediate_size": 64,
                    "num_attention_heads": 2, "num_key_value_heads": 1},
        "train": {"num_workers": 1, "batch_size": 4, "micro_batch_size": 4, "max_steps": 20,
                  "log_every": 1, "zero_stage": 0},
    }
    path = base / "tiny.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("raykd: error: "), proc.stderr
    return lines[0]


def listed(head: Head, env: dict[str, str]) -> dict[str, str]:
    proc = raykd("list", "--address", head.url, env=env)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines()[1:]]
    return {r[0]: r[1] for r in rows}


# --------------------------------------------------------------------------- on a cluster


@pytest.mark.ray
def test_submit_follow_succeed_and_refuse_a_duplicate(head, client_home, tiny_job):
    env = _clean_env(client_home)
    # Overrides travel in the shipped, resolved job (the file itself says 20 steps).
    proc = raykd("submit", str(tiny_job), "--address", head.url, "train.max_steps=2",
                 env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "raykd-tiny\n"

    logs = raykd("logs", "raykd-tiny", "--follow", "--address", head.url, env=env, timeout=600)
    assert logs.returncode == 0, logs.stdout[-3000:] + logs.stderr[-2000:]
    assert logs.stderr.strip().splitlines()[-1] == "raykd: raykd-tiny SUCCEEDED"
    run_dir = tiny_job.parent / "runs" / "tiny"
    assert f"raykd: run directory {run_dir}" in logs.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "succeeded" and summary["steps"] == 2
    assert "max_steps: 2" in (run_dir / "job.yaml").read_text()

    status = raykd("status", "raykd-tiny", "--address", head.url, env=env)
    assert status.returncode == 0 and status.stdout.startswith("raykd-tiny: SUCCEEDED")
    plain = raykd("logs", "raykd-tiny", "--address", head.url, env=env)
    assert plain.returncode == 0 and '"status": "succeeded"' in plain.stdout

    # The same run again is refused before anything is uploaded or started.
    again = raykd("submit", str(tiny_job), "--address", head.url, env=env)
    assert one_line_error(again) == (
        f"raykd: error: run.name: job raykd-tiny already exists on {head.url} (SUCCEEDED); "
        "choose another run.name, e.g. run.name=tiny-2")
    assert [sid for sid in listed(head, env) if sid.startswith("raykd-tiny")] == ["raykd-tiny"]


@pytest.mark.ray
def test_stop_a_running_job(head, client_home, tiny_job):
    env = _clean_env(client_home)
    proc = raykd("submit", str(tiny_job), "run.name=stopme", "--address", head.url, env=env)
    assert proc.returncode == 0 and proc.stdout == "raykd-stopme\n", proc.stderr
    # Stop it once `raykd run` is really running on the cluster, not while it is pending.
    deadline = time.monotonic() + 120
    while True:
        out = raykd("logs", "raykd-stopme", "--address", head.url, env=env).stdout
        if "raykd: preparing teacher" in out:
            break
        assert time.monotonic() < deadline, out
        time.sleep(1)
    assert listed(head, env)["raykd-stopme"] == "RUNNING"
    stop = raykd("stop", "raykd-stopme", "--address", head.url, env=env)
    assert stop.returncode == 0, stop.stderr
    assert stop.stdout == "raykd-stopme: STOPPED\n"
    assert listed(head, env)["raykd-stopme"] == "STOPPED"
    assert not (tiny_job.parent / "runs" / "stopme" / "summary.json").exists()


@pytest.mark.ray
def test_bad_job_file_is_refused_before_submission(head, client_home, tiny_job):
    env = _clean_env(client_home)
    proc = raykd("submit", str(tiny_job), "run.name=bad", "train.zero_stage=9",
                 "--address", head.url, env=env)
    assert one_line_error(proc) == (
        f"raykd: error: {tiny_job}: train.zero_stage: must be 0-3, got 9")
    unknown = raykd("submit", str(tiny_job), "run.name=bad", "teacher.replica.max=2",
                    "--address", head.url, env=env)
    assert "teacher.replica: unknown key (did you mean 'replicas'?)" in one_line_error(unknown)
    assert "raykd-bad" not in listed(head, env)
    missing = raykd("status", "raykd-nope", "--address", head.url, env=env)
    assert one_line_error(missing).startswith(
        f"raykd: error: raykd-nope: no such job on {head.url}")


@pytest.mark.ray
def test_a_job_that_fails_on_the_cluster(head, client_home, tiny_job, tmp_path):
    # Valid as a job file, so it is submitted; the cluster has no such data, so `raykd run`
    # there fails with its one-line error, and following the job says so.
    env = _clean_env(client_home)
    missing = tmp_path / "nowhere" / "*.txt"
    proc = raykd("submit", str(tiny_job), "run.name=nodata", f"data.source={missing}",
                 "--address", head.url, env=env)
    assert proc.returncode == 0, proc.stderr
    logs = raykd("logs", "raykd-nodata", "--follow", "--address", head.url, env=env)
    assert logs.returncode == 1
    assert f"raykd: error: data.source: no files match {missing}" in logs.stdout
    assert logs.stderr.strip().splitlines()[-1] == "raykd: raykd-nodata FAILED"
    status = raykd("status", "raykd-nodata", "--address", head.url, env=env)
    assert status.stdout.startswith("raykd-nodata: FAILED (")
    # Submitting a failed run again says how to continue it.
    again = raykd("submit", str(tiny_job), "run.name=nodata", "--address", head.url, env=env)
    assert one_line_error(again) == (
        f"raykd: error: run.name: job raykd-nodata already exists on {head.url} (FAILED); "
        f"to continue it, `ray job delete raykd-nodata --address {head.url}` and submit "
        "again with run.resume=true; or choose another run.name, e.g. run.name=nodata-2")


@pytest.mark.ray
def test_token_auth(head, tmp_path, tiny_job):
    nobody = tmp_path / "home"  # no ~/.ray/auth_token, no token variables
    nobody.mkdir()
    refused = raykd("submit", str(tiny_job), "run.name=noauth", "--address", head.url,
                    env=_clean_env(nobody))
    assert one_line_error(refused) == (
        f"raykd: error: {head.url}: the cluster requires a Ray auth token and none was sent; "
        "set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, or put the cluster's token in "
        "~/.ray/auth_token")
    wrong = raykd("list", "--address", head.url,
                  env=_clean_env(nobody, RAY_AUTH_TOKEN=secrets.token_hex(24)))
    assert one_line_error(wrong) == (
        f"raykd: error: {head.url}: the cluster refused the auth token from RAY_AUTH_TOKEN; "
        "it is not this cluster's token")
    # The right token from the environment (RAY_AUTH_MODE unset: raykd sends it anyway).
    ok = _clean_env(nobody, RAY_AUTH_TOKEN=head.token)
    assert raykd("list", "--address", head.url, env=ok).returncode == 0
    token_file = tmp_path / "token"
    token_file.write_text(head.token)
    by_path = _clean_env(nobody, RAY_AUTH_TOKEN_PATH=str(token_file))
    assert "raykd-noauth" not in listed(head, by_path)  # the refused submit left nothing
    # RAY_AUTH_MODE=disabled means: never send a token, even one that is at hand.
    off = raykd("list", "--address", head.url,
                env=_clean_env(nobody, RAY_AUTH_TOKEN=head.token, RAY_AUTH_MODE="disabled"))
    assert "RAY_AUTH_MODE=disabled keeps raykd from sending one" in one_line_error(off)


@pytest.mark.ray
def test_address_from_the_environment(head, client_home):
    env = _clean_env(client_home, RAY_ADDRESS=head.url)
    assert raykd("list", env=env).returncode == 0
    # --address wins over RAY_ADDRESS (Ray's SDK alone would use the variable).
    closed = f"http://127.0.0.1:{free_ports(1)[0]}"
    env = _clean_env(client_home, RAY_ADDRESS=closed)
    assert raykd("list", "--address", head.url, env=env).returncode == 0
    assert one_line_error(raykd("list", env=env)) == (
        f"raykd: error: {closed} (from RAY_ADDRESS): cannot reach the Ray Jobs API "
        "(Connection refused)")


def test_unreachable_address_is_one_line(tmp_path, tiny_job):
    closed = f"http://127.0.0.1:{free_ports(1)[0]}"
    env = _clean_env(tmp_path)
    started = time.monotonic()
    for args in (("submit", str(tiny_job)), ("status", "raykd-x"), ("logs", "raykd-x"),
                 ("stop", "raykd-x"), ("list",)):
        proc = raykd(*args, "--address", closed, env=env)
        assert one_line_error(proc) == (
            f"raykd: error: {closed}: cannot reach the Ray Jobs API (Connection refused)")
    assert time.monotonic() - started < 60
    assert one_line_error(raykd("list", env=env)).startswith("raykd: error: --address: no cluster")
    assert "is not a Jobs API address" in one_line_error(
        raykd("list", "--address", "ray://127.0.0.1:10001", env=env))


def test_a_web_server_that_is_not_ray_is_one_line(tmp_path):
    import http.server
    import threading

    class NotRay(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            self.send_error(404)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotRay)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        proc = raykd("list", "--address", url, env=_clean_env(tmp_path))
        assert one_line_error(proc).startswith(f"raykd: error: {url}: not a Ray Jobs API ")
    finally:
        server.shutdown()
        server.server_close()


# --------------------------------------------------------------------------- no cluster


def test_address_resolution(monkeypatch):
    for var in RAY_VARS:
        monkeypatch.delenv(var, raising=False)
    assert auth.resolve_address("127.0.0.1:8265") == auth.Address("http://127.0.0.1:8265",
                                                                   "--address")
    monkeypatch.setenv("RAY_ADDRESS", "http://b:1/")
    assert auth.resolve_address(None) == auth.Address("http://b:1", "RAY_ADDRESS")
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "https://a:2")
    assert auth.resolve_address(None).source == "RAY_API_SERVER_ADDRESS"
    assert auth.resolve_address("http://c:3").url == "http://c:3"
    for bad, words in (("auto", "not a Jobs API address"), ("ftp://x:1", r"not an http\(s\)"),
                       ("http://x:port", "invalid port")):
        with pytest.raises(UserError, match=words):
            auth.resolve_address(bad)


def test_token_lookup_order(monkeypatch, tmp_path):
    for var in RAY_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert auth.find_token().value is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert auth.find_token() == auth.Token("from-home", str(tmp_path / ".ray" / "auth_token"))
    (tmp_path / "t").write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "t"))
    assert auth.find_token().value == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert auth.find_token().headers() == {"Authorization": "Bearer from-env"}
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert auth.find_token().value is None
    monkeypatch.delenv("RAY_AUTH_MODE")
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(UserError, match="RAY_AUTH_TOKEN_PATH: cannot read token file"):
        auth.find_token()


def test_what_a_submission_ships(tmp_path):
    project = tmp_path / "proj"
    for rel in ("raykd/__init__.py", "jobs/a.yaml", "data/x.txt", ".venv/bin/python",
                ".git/HEAD", "runs/old/summary.json", "out/r/summary.json",
                "raykd/__pycache__/m.pyc", "pkg.egg-info/PKG-INFO", ".raykd/job.yaml",
                "big/weights.bin", "data/cache/blob.bin", "data/keep.bin"):
        (project / rel).parent.mkdir(parents=True, exist_ok=True)
        (project / rel).write_text("x")
    (project / ".gitignore").write_text("big/\n")
    (project / "data" / ".rayignore").write_text("cache\n")
    job = job_from_dict({"data": {"source": "data/x.txt"}, "teacher": {"model": "m"},
                         "run": {"output_dir": "out"}, "train": {"lr": 0.01}})
    with ship.staged(job, "jobs/a.yaml", project) as root:
        shipped = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
        resolved = (root / ship.SHIPPED_JOB).read_text()
    assert shipped == [".gitignore", ".raykd/job.yaml", "data/.rayignore", "data/keep.bin",
                       "data/x.txt", "jobs/a.yaml", "raykd/__init__.py"]
    assert "# raykd run .raykd/job.yaml" in resolved and "lr: 0.01" in resolved
    assert job_from_dict(yaml.safe_load(resolved)) == job
    assert not root.exists()  # the staging copy is gone once submitted

    # Submitting from a directory far bigger than a job package fails before any upload.
    with open(project / "data" / "huge.bin", "wb") as f:
        f.truncate(ship.MAX_BYTES + 1)  # sparse: no real disk use
    with pytest.raises(UserError, match=r"more than 500 MiB to ship with the job \(at data"), \
            ship.staged(job, "jobs/a.yaml", project):
        pass
