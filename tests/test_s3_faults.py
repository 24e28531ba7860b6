"""S3 faults against a real S3-protocol server (moto_server) on 127.0.0.1: a missing bucket,
no server, refused credentials, and the server freezing mid-run. Each gives one line
naming the store, exit code 2, and leaves what was written usable: after the freeze the
run resumes from its last complete checkpoint and still trains every sample once."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from raykd.run_dir import latest_checkpoint
from tests import s3
from tests.test_pipeline import tiny_job

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoServer:
    """`moto_server` as its own process, so the test can freeze or kill it."""

    def __init__(self, **env: str):
        self.port = free_port()
        self.proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p",
                                      str(self.port)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, env={**os.environ, **env})
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise TimeoutError("moto_server did not start")

    def uri(self, path: str) -> str:
        return s3.S3Server("127.0.0.1", self.port).uri(path)

    def make_bucket(self, name: str) -> None:
        s3.S3Server("127.0.0.1", self.port).filesystem().create_dir(name)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGCONT)
        self.proc.kill()
        self.proc.wait(10)


@pytest.fixture(autouse=True)
def credentials(monkeypatch):
    for k, v in s3.CREDENTIALS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("RAYKD_S3_TIMEOUT_S", "3")


def write_job(tmp_path: Path, teacher: Path, storage: str, name: str = "s3") -> Path:
    job = tiny_job(teacher, tmp_path / "runs", name, zero_stage=0, max_steps=2)
    job["train"]["storage"] = storage
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def raykd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "raykd"), *args], capture_output=True, text=True,
                          timeout=600, env=os.environ.copy())


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [x for x in proc.stderr.strip().splitlines() if x.startswith("raykd: error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


def test_a_missing_bucket(tmp_path, tiny_teacher):
    server = MotoServer()
    try:
        job = write_job(tmp_path, tiny_teacher, server.uri("no-such-bucket/runs"))
        line = one_line_error(raykd("run", str(job)))
    finally:
        server.stop()
    assert "train.storage: bucket 'no-such-bucket'" in line and "does not exist" in line
    assert not (tmp_path / "runs").exists()


def test_no_server_fails_fast(tmp_path, tiny_teacher):
    dead = f"s3://b/runs?endpoint_override=127.0.0.1:{free_port()}&scheme=http"
    start = time.time()
    line = one_line_error(raykd("validate", str(write_job(tmp_path, tiny_teacher, dead))))
    assert line.startswith("raykd: error: train.storage: cannot use s3://b/runs")
    assert time.time() - start < 90  # bounded retries, not a hang


def test_refused_credentials(tmp_path, tiny_teacher):
    # With INITIAL_NO_AUTH_ACTION_COUNT=0 moto enforces IAM: our keys belong to no user.
    server = MotoServer(INITIAL_NO_AUTH_ACTION_COUNT="0")
    try:
        line = one_line_error(raykd("run", str(write_job(tmp_path, tiny_teacher,
                                                          server.uri("bucket/runs")))))
    finally:
        server.stop()
    assert line.startswith("raykd: error: train.storage: cannot use s3://bucket/runs")
    assert not (tmp_path / "runs").exists()


@pytest.mark.ray
def test_the_store_freezes_mid_run_then_the_run_resumes(tmp_path, tiny_teacher):
    import ray

    from raykd.config import job_from_dict
    from raykd.errors import UserError
    from raykd.runner import run
    from tests.test_pipeline import expected_train

    server = MotoServer()
    server.make_bucket("ckpt")
    job = tiny_job(tiny_teacher, tmp_path / "runs", "frozen", zero_stage=2,
                   checkpoint_every=4, log_every=1)
    job["train"]["storage"] = server.uri("ckpt/runs")
    run_dir = tmp_path / "runs" / "frozen"
    frozen = []

    def freeze_after_a_checkpoint() -> None:
        deadline = time.time() + 300
        while time.time() < deadline:
            pointer = latest_checkpoint(run_dir) if run_dir.exists() else None
            if pointer and pointer["step"] >= 4:
                server.proc.send_signal(signal.SIGSTOP)
                frozen.append(pointer["step"])
                return
            time.sleep(0.05)

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        threading.Thread(target=freeze_after_a_checkpoint, daemon=True).start()
        with pytest.raises(UserError) as lost:
            run(job_from_dict(job), log=lambda _: None)
        assert frozen, "the run ended before the store could be frozen"
        message = str(lost.value)
        assert message.startswith("train.storage: cannot use s3://ckpt/runs")
        assert "last complete checkpoint: step" in message
        assert "raykd resume" in message and "\n" not in message
        server.proc.send_signal(signal.SIGCONT)  # the store is back, with what it held
        resumed = {**job, "run": {**job["run"], "resume": True}}
        s = run(job_from_dict(resumed), log=lambda _: None).summary
    finally:
        ray.shutdown()
        server.stop()
    # Every sample once in the final model (the summary reads the final checkpoint's ledger).
    assert s["status"] == "succeeded"
    assert s["samples_per_epoch"] == s["rows_per_epoch"] == [s["train_sequences"]]
    assert s["train_sequences"] == len(expected_train(job_from_dict(job)))
