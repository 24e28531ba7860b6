"""The teacher pool autoscales on a real (fake-node) autoscaling Ray cluster: replicas rise
above teacher.replicas.min under load, never exceed max, land only on teacher nodes, and
the teacher nodes go away when idle.

`ray.cluster_utils.AutoscalingCluster` builds the fake-node autoscaling config; starting
and stopping are our own, because its own run `ray stop --force`, which would kill every
Ray on the machine. This head has its own temp dir and ports (the fake node provider is told
the GCS port: it assumes 6379 otherwise, and its node launcher then blocks the autoscaler
for good), and shutdown kills exactly the processes whose command line names that temp dir
(the head's and the fake nodes' daemons) and their descendants (workers and agents, which
retitle themselves `ray::...`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.ports import free_ports

pytestmark = pytest.mark.ray

TEACHER_NODE = {"resources": {"CPU": 1, "teacher": 1}, "node_config": {},
                "min_workers": 0, "max_workers": 3}


def _processes_using(*needles: str) -> list:
    """The processes whose command line names any of `needles`, and all their descendants."""
    import psutil

    found = {p.pid: p for p in psutil.process_iter(["pid", "cmdline"])
             if any(n in " ".join(p.info["cmdline"] or []) for n in needles)}
    for p in list(found.values()):
        with contextlib.suppress(psutil.NoSuchProcess):
            found.update((c.pid, c) for c in p.children(recursive=True))
    return list(found.values())


def _kill_all(*needles: str) -> list:
    """Stop the processes of the Ray whose temp dir or GCS address is named in `needles`
    (the head's Ray Client proxy names only the address; orphaned once its parent stops,
    it is no descendant either); returns any still alive."""
    import psutil

    stopped: dict[int, psutil.Process] = {}
    for _ in range(5):  # again, for what a raylet started meanwhile
        procs = [p for p in _processes_using(*needles) if p.pid not in stopped]
        if not procs:
            break
        for p in procs:
            stopped[p.pid] = p
            with contextlib.suppress(psutil.NoSuchProcess):
                p.terminate()
        _, alive = psutil.wait_procs(procs, timeout=15)
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(alive, timeout=10)
    return [p for p in stopped.values() if p.is_running()] + _processes_using(*needles)


@pytest.fixture(scope="module")
def autoscaling_cluster(tmp_path_factory):
    import ray
    from ray._private.services import get_node_ip_address
    from ray.cluster_utils import AutoscalingCluster

    class Cluster(AutoscalingCluster):
        # Ray 2.60's wheel lacks fake_multi_node/example.yaml, which the base class reads;
        # build the same kind of config here instead.
        def _generate_config(self, head_resources, worker_node_types, autoscaler_v2=False,
                             gcs_address=None, **config_kwargs):
            return {
                "cluster_name": "raykd-fake", "max_workers": 3,
                "provider": {"type": "fake_multinode", "use_node_id_as_ip": True,
                             "disable_node_updaters": True, "disable_launch_config_check": True,
                             "gcs_address": gcs_address},
                "available_node_types": {
                    **worker_node_types,
                    "ray.head.default": {"resources": head_resources, "node_config": {},
                                         "max_workers": 0},
                },
                "head_node_type": "ray.head.default", "auth": {}, "upscaling_speed": 1.0,
                "idle_timeout_minutes": 0.1, "docker": {}, "file_mounts": {},
                "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
                "worker_setup_commands": [], "head_start_ray_commands": [],
                "worker_start_ray_commands": [], "cluster_synced_files": [],
                "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
                **config_kwargs,
            }

    port, dashboard, agent, metrics, client, manager, objects, runtime_env = free_ports(8)
    # The address the head's GCS gets (`ray start` picks the node IP the same way); the
    # fake nodes, started by the autoscaler, join it there.
    gcs = f"{get_node_ip_address()}:{port}"
    cluster = Cluster(head_resources={"CPU": 2}, worker_node_types={"teacher": TEACHER_NODE},
                      gcs_address=gcs)
    root = tmp_path_factory.mktemp("autoscaling")
    # Ray's socket paths live under the temp dir and must fit AF_UNIX's 107 bytes.
    temp = Path(tempfile.mkdtemp(prefix="raykd-as-", dir="/tmp"))
    (root / "autoscaling.json").write_text(json.dumps(cluster._config))
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head",
           f"--autoscaling-config={root / 'autoscaling.json'}", "--num-cpus=2",
           f"--temp-dir={temp}", f"--port={port}", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={agent}",
           f"--metrics-export-port={metrics}", f"--ray-client-server-port={client}",
           f"--node-manager-port={manager}", f"--object-manager-port={objects}",
           f"--runtime-env-agent-port={runtime_env}", "--disable-usage-stats"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    # No token auth: this head is for this test's driver alone.
    env.update(AUTOSCALER_UPDATE_INTERVAL_S="1", RAY_FAKE_CLUSTER="1", RAY_AUTH_MODE="disabled")
    try:
        started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
        ray.init(address=gcs, log_to_driver=False)
        yield
    finally:
        ray.shutdown()
        left = _kill_all(str(temp), f"--address={gcs}")
    assert left == []
    shutil.rmtree(temp, ignore_errors=True)


def _teacher_nodes() -> set[str]:
    import ray

    return {n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("teacher")}


def test_teacher_pool_scales_out_within_bounds_on_teacher_nodes(autoscaling_cluster, tmp_path):
    import ray
    from ray._private import state

    from raykd.config import job_from_dict
    from raykd.runner import label_only
    from tests.tiny import make_llama, shakespeare

    teacher = make_llama(tmp_path / "teacher", layers=6, hidden=256, heads=4, kv_heads=2,
                         intermediate=512)
    job = job_from_dict({
        "run": {"name": "scale", "output_dir": str(tmp_path / "runs")},
        "data": {"source": [shakespeare("macbeth"), shakespeare("tempest")], "seq_len": 64,
                 "eval_fraction": 0.01, "eval_max_samples": 2},
        "teacher": {"model": str(teacher), "batch_size": 2, "num_cpus": 1,
                    "replicas": {"min": 1, "max": 3}, "resources": {"teacher": 1}},
        "labels": {"top_k": 8, "cache": str(tmp_path / "cache")},
    })
    seen: list[tuple[int, set[str]]] = []  # (live replicas, their nodes) over time
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            live = [a for a in state.actors().values()
                    if "TeacherReplica" in a.get("ActorClassName", "") and a["State"] == "ALIVE"]
            seen.append((len(live), {a["Address"]["NodeID"] for a in live}))
            time.sleep(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        out = label_only(job, log=lambda _: None)
    finally:
        stop.set()
        watcher.join(timeout=5)
    assert out["status"] == "succeeded"
    peak = max(n for n, _ in seen)
    assert peak > 1, f"the pool never grew past min=1 ({len(seen)} samples)"
    assert peak <= 3
    teacher_nodes_seen = set().union(*(nodes for _, nodes in seen))
    head = {n["NodeID"] for n in ray.nodes() if not n["Resources"].get("teacher")}
    assert teacher_nodes_seen and not teacher_nodes_seen & head  # never on the head

    # Idle teacher nodes are released (idle_timeout_minutes: 0.1).
    deadline = time.time() + 120
    while _teacher_nodes() and time.time() < deadline:
        time.sleep(2)
    assert not _teacher_nodes()
