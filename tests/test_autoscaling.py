"""The teacher pool autoscales on a real (fake-node) autoscaling Ray cluster: replicas rise
above teacher.replicas.min under load, never exceed max, land only on teacher nodes, and
the teacher nodes go away when idle.

`ray.cluster_utils.AutoscalingCluster` starts and stops with `ray stop --force`, which
kills every Ray process of this user: this module must not run beside other Ray work
(CI runs tests one at a time).
"""

from __future__ import annotations

import threading
import time

import pytest

pytestmark = pytest.mark.ray

TEACHER_NODE = {"resources": {"CPU": 1, "teacher": 1}, "node_config": {},
                "min_workers": 0, "max_workers": 3}


@pytest.fixture(scope="module")
def autoscaling_cluster():
    import ray
    from ray.cluster_utils import AutoscalingCluster

    class Cluster(AutoscalingCluster):
        # Ray 2.60's wheel lacks fake_multi_node/example.yaml, which the base class reads;
        # build the same kind of config here instead.
        def _generate_config(self, head_resources, worker_node_types, autoscaler_v2=False,
                             **config_kwargs):
            return {
                "cluster_name": "raykd-fake", "max_workers": 3,
                "provider": {"type": "fake_multinode", "use_node_id_as_ip": True,
                             "disable_node_updaters": True, "disable_launch_config_check": True},
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

    cluster = Cluster(head_resources={"CPU": 2}, worker_node_types={"teacher": TEACHER_NODE})
    cluster.start()
    ray.init(address="auto", log_to_driver=False)
    yield
    ray.shutdown()
    cluster.shutdown()


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
