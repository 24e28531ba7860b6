"""KubeRay manifests for a job: a RayJob whose cluster has a head and two autoscaled worker
groups, `teacher` and `student`, sized from the job's own scaling keys.

    raykd render-k8s jobs/smollm2-gpu.yaml --image REGISTRY/raykd:0.1.0 > rayjob.yaml

One teacher replica per teacher pod (teacher.num_gpus GPUs, teacher.num_cpus CPUs plus one
for Ray Data's read and pack tasks), teacher.replicas.min..max pods; one Train worker per
student pod, train.num_workers pods. The job's placement keys become the groups' Ray node
labels (`workerGroupSpecs[].labels`) and custom resources (`workerGroupSpecs[].resources`),
which is how raykd pins replicas and workers to their groups. `placement_problems` checks
any RayCluster spec (rendered or hand-written) against a job the same way.
"""

from __future__ import annotations

import math
import re
import shlex
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import yaml

from raykd.config import JobConfig

ROLE_LABEL = "raykd.io/role"
PLACEHOLDER_IMAGE = "REGISTRY/raykd:0.1.0"  # built from cluster/Dockerfile; edit or --image
RAY_UID, RAY_GID = 1000, 100  # user `ray` in the rayproject/ray images
DATA_CPUS = 1  # per teacher pod, for Ray Data's read/tokenise/pack tasks next to the replica
S3_SECRET, HF_SECRET = "raykd-s3", "raykd-hf"
TTL_AFTER_FINISHED_S = 600  # keep the finished cluster 10 minutes for `raykd logs`
ACTIVE_DEADLINE_S = 24 * 3600
MAX_NAME = 47  # KubeRay derives RayCluster and Service names from a RayJob's name


# --------------------------------------------------------------------------- sizing


@dataclass
class Group:
    """One worker group: what a pod offers and how many pods there may be."""

    name: str
    replicas: int
    min_replicas: int
    max_replicas: int
    cpus: int
    gpus: int
    memory_gib: int
    resources: dict[str, float] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    idle_timeout_s: int = 60


def teacher_group(job: JobConfig) -> Group:
    t = job.teacher
    cpus = max(1, math.ceil(t.num_cpus)) + DATA_CPUS
    gpus = math.ceil(t.num_gpus)
    # Loading a teacher is the slow part of scaling out, so idle teacher pods linger longer.
    return Group("teacher", replicas=t.replicas.min, min_replicas=t.replicas.min,
                 max_replicas=t.replicas.max, cpus=cpus, gpus=gpus,
                 memory_gib=_memory_gib(cpus, gpus), resources=dict(t.resources),
                 labels={ROLE_LABEL: "teacher", **t.node_labels}, idle_timeout_s=300)


def student_group(job: JobConfig) -> Group:
    t = job.train
    cpus = max(1, math.ceil(t.cpus_per_worker))
    gpus = 1 if t.use_gpu else 0
    # Train asks for every worker at once; the pods start with the job and may scale in
    # to zero once training is over.
    return Group("student", replicas=t.num_workers, min_replicas=0,
                 max_replicas=t.num_workers, cpus=cpus, gpus=gpus,
                 memory_gib=_memory_gib(cpus, gpus), resources=dict(t.resources),
                 labels={ROLE_LABEL: "student", **t.node_labels}, idle_timeout_s=120)


def _memory_gib(cpus: int, gpus: int) -> int:
    # A placeholder rule a user edits: 4 GiB per CPU, 32 GiB per GPU for weights staging.
    return 4 * cpus + 32 * gpus


# --------------------------------------------------------------------------- manifests


def resource_name(run_name: str) -> str:
    """A DNS-1035 name from the run name, prefixed like raykd's submission ids."""
    slug = re.sub(r"[^a-z0-9-]+", "-", run_name.lower()).strip("-") or "job"
    return f"raykd-{slug}"[:MAX_NAME].rstrip("-")


def ray_job(job: JobConfig, job_file: str, overrides: list[str],
            image: str = PLACEHOLDER_IMAGE) -> dict[str, Any]:
    """A RayJob that creates its own cluster, runs `raykd run job_file overrides...` on it
    (the file as it is inside the image), and deletes the cluster when the job ends."""
    name = resource_name(job.run.name)
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": name, "labels": _app_labels(name)},
        "spec": {
            "entrypoint": shlex.join(["raykd", "run", job_file, *overrides]),
            # The same id `raykd submit` would use, so `raykd status/logs` find it.
            "jobId": name,
            "runtimeEnvYAML": "env_vars:\n  PYTHONUNBUFFERED: '1'\n",
            "submissionMode": "K8sJobMode",
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": TTL_AFTER_FINISHED_S,
            "activeDeadlineSeconds": ACTIVE_DEADLINE_S,
            "backoffLimit": 0,  # a retry is a new cluster; resuming is raykd's job
            "submitterConfig": {"backoffLimit": 2},
            "submitterPodTemplate": _submitter(image),
            "rayClusterSpec": ray_cluster_spec(job, image),
        },
    }


def ray_cluster_spec(job: JobConfig, image: str = PLACEHOLDER_IMAGE) -> dict[str, Any]:
    return {
        "rayVersion": _ray_version(),
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": {
            "version": "v2",
            "upscalingMode": "Default",
            "idleTimeoutSeconds": 60,
            "securityContext": _container_security(),
            "resources": _quantities(cpus=0.5, memory="512Mi"),
        },
        # KubeRay creates the token Secret and hands it to the submitter and every pod.
        "authOptions": {"mode": "token"},
        "headGroupSpec": {
            # The driver, the Train controller and Ray Data's split coordinator live on the
            # head; no replica or worker should, so it offers Ray no CPUs.
            "resources": {"CPU": "0"},
            "rayStartParams": {},
            "template": _pod("ray-head", image, cpus=4, gpus=0, memory_gib=16,
                             ports=[("gcs", 6379), ("dashboard", 8265), ("client", 10001)]),
        },
        "workerGroupSpecs": [_worker_group(g, image)
                             for g in (teacher_group(job), student_group(job))],
    }


def _worker_group(g: Group, image: str) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "groupName": g.name,
        "replicas": g.replicas,
        "minReplicas": g.min_replicas,
        "maxReplicas": g.max_replicas,
        "idleTimeoutSeconds": g.idle_timeout_s,
        "labels": dict(g.labels),
        "rayStartParams": {},
        "template": _pod("ray-worker", image, g.cpus, g.gpus, g.memory_gib),
    }
    if g.resources:
        spec["resources"] = {k: _number(v) for k, v in g.resources.items()}
    return spec


def _pod(container: str, image: str, cpus: float, gpus: int, memory_gib: int,
         ports: list[tuple[str, int]] | None = None) -> dict[str, Any]:
    c: dict[str, Any] = {
        "name": container,
        "image": image,
        "resources": _quantities(cpus=cpus, memory=f"{memory_gib}Gi", gpus=gpus),
        "env": _secret_env(),
        "securityContext": _container_security(),
        # No /dev/shm volume: KubeRay mounts a memory-backed one sized to the pod itself.
    }
    if ports:
        c["ports"] = [{"name": n, "containerPort": p} for n, p in ports]
    spec: dict[str, Any] = {
        "securityContext": _pod_security(),
        # Autoscaler v2 treats a pod as one Ray node; a restarted pod would be a stale one.
        "restartPolicy": "Never",
        "containers": [c],
    }
    if gpus:
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists",
                                "effect": "NoSchedule"}]
    return {"spec": spec}


def _submitter(image: str) -> dict[str, Any]:
    # KubeRay fills in the `ray job submit` command (and the auth token) of the first
    # container; the template only makes the submitter run as non-root too.
    return {"spec": {
        "securityContext": _pod_security(),
        "restartPolicy": "Never",
        "containers": [{"name": "ray-job-submitter", "image": image,
                        "resources": _quantities(cpus=0.5, memory="1Gi"),
                        "securityContext": _container_security()}],
    }}


def _secret_env() -> list[dict[str, Any]]:
    """Credentials only by reference to Secrets (optional, so a cluster without S3 or a
    gated teacher still starts)."""
    refs = [("AWS_ACCESS_KEY_ID", S3_SECRET), ("AWS_SECRET_ACCESS_KEY", S3_SECRET),
            ("HF_TOKEN", HF_SECRET)]
    return [{"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key,
                                                         "optional": True}}}
            for key, secret in refs]


def _pod_security() -> dict[str, Any]:
    return {"runAsNonRoot": True, "runAsUser": RAY_UID, "runAsGroup": RAY_GID,
            "fsGroup": RAY_GID, "seccompProfile": {"type": "RuntimeDefault"}}


def _container_security() -> dict[str, Any]:
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def _quantities(cpus: float, memory: str, gpus: int = 0) -> dict[str, Any]:
    # requests == limits: Guaranteed pods, and Ray sizes itself from the limits.
    q = {"cpu": _number(cpus), "memory": memory}
    if gpus:
        q["nvidia.com/gpu"] = str(gpus)
    return {"limits": dict(q), "requests": dict(q)}


def _app_labels(name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "raykd", "app.kubernetes.io/instance": name}


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _ray_version() -> str:
    try:
        return metadata.version("ray")
    except metadata.PackageNotFoundError:  # pragma: no cover - ray is a dependency
        return "2.60.0"


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (runtimeEnvYAML) as literal blocks, so they read as YAML."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def to_yaml(manifest: dict[str, Any], header: str = "") -> str:
    return header + yaml.dump(manifest, Dumper=_Dumper, sort_keys=False, width=100)


# --------------------------------------------------------------------------- checking


@dataclass
class NodeType:
    """What one node (pod) of a group offers to Ray, and how many there may be."""

    name: str
    resources: dict[str, float]  # CPU, GPU and custom resources
    labels: dict[str, str]
    max_nodes: int


def node_types(cluster_spec: dict[str, Any]) -> list[NodeType]:
    """The worker groups of a RayCluster spec as Ray will see them: CPU and GPU from the
    container limits unless the group's `resources` override them (as KubeRay does)."""
    found = []
    for g in cluster_spec.get("workerGroupSpecs", []):
        limits = g["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})
        offered = {"CPU": _parse_quantity(limits.get("cpu", 0)),
                   "GPU": _parse_quantity(limits.get("nvidia.com/gpu", 0))}
        params = g.get("rayStartParams", {})
        if "num-cpus" in params:
            offered["CPU"] = float(params["num-cpus"])
        if "num-gpus" in params:
            offered["GPU"] = float(params["num-gpus"])
        for k, v in (g.get("resources") or {}).items():
            offered[k] = _parse_quantity(v)
        found.append(NodeType(g["groupName"], offered, dict(g.get("labels") or {}),
                              int(g["maxReplicas"])))
    return found


def placement_problems(job: JobConfig, nodes: list[NodeType]) -> list[str]:
    """Why these node types cannot host the job's teacher pool at its maximum and all of
    its Train workers; empty when they can. Each role counts only nodes that carry its
    labels and resources, which is where Ray will place it."""
    t, tr = job.teacher, job.train
    teacher = {"CPU": t.num_cpus, "GPU": t.num_gpus, **t.resources}
    student = {"CPU": tr.cpus_per_worker, "GPU": 1.0 if tr.use_gpu else 0.0, **tr.resources}
    problems = []
    for role, need, labels, count, key in (
            ("teacher", teacher, t.node_labels, t.replicas.max, "teacher.replicas.max"),
            ("student", student, tr.node_labels, tr.num_workers, "train.num_workers")):
        fits = sum(n.max_nodes * _per_node(n, need) for n in nodes
                   if all(n.labels.get(k) == v for k, v in labels.items()))
        if fits < count:
            want = ", ".join(f"{k}={_number(v)}" for k, v in need.items() if v)
            problems.append(f"{role}: node types with labels {labels or {}} fit {fits} of "
                            f"{count} ({key}), each needing {want}")
    return problems


def _per_node(node: NodeType, need: dict[str, float]) -> int:
    counts = [math.floor(node.resources.get(k, 0.0) / v + 1e-9) for k, v in need.items() if v]
    return min(counts) if counts else 0


def _parse_quantity(value: Any) -> float:
    """A Kubernetes CPU/GPU quantity ("500m", "4", 2) as a number."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)
