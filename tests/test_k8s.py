"""Every cluster file and every rendered manifest is valid, strictly, and can host its job.

RayCluster / RayJob manifests (the ones in cluster/ and `raykd render-k8s` of every
jobs/*.yaml) are validated against the KubeRay v1 CRD schemas vendored in cluster/crds/
with jsonschema's Draft7Validator. The CRD schemas accept unknown keys (Kubernetes prunes
them silently), so the schema is first made strict: every object that lists `properties`
and allows nothing else gets additionalProperties: false. A typo then fails here instead
of vanishing on `kubectl apply`. The cluster-launcher file is checked against Ray's own
schema (ray/autoscaler/ray-schema.json), made strict the same way.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from raykd.cluster import k8s
from raykd.config import load_job

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
JOBS = sorted((ROOT / "jobs").glob("*.yaml"))
CRDS = {"RayCluster": CLUSTER / "crds" / "ray.io_rayclusters.yaml",
        "RayJob": CLUSTER / "crds" / "ray.io_rayjobs.yaml"}
MANIFESTS = sorted(CLUSTER.glob("ray-cluster.*.yaml")) + sorted(CLUSTER.glob("ray-job.*.yaml"))
VMS = sorted(CLUSTER.glob("ray-vm.*.yaml"))
# DNS-1035 label: what KubeRay needs, since it names Services after the resource.
OBJECT_META = {
    "type": "object", "required": ["name"], "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


def _load(path: Path) -> Any:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 2.3 MB
    with open(path) as f:
        return yaml.load(f, Loader=loader)


def strict(schema: Any) -> Any:
    """The schema with unknown keys forbidden wherever it names the allowed ones."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: (v if k in ("enum", "default", "required", "example") else strict(v))
           for k, v in schema.items()}
    if "properties" in out:
        out["properties"] = {k: strict(v) for k, v in schema["properties"].items()}
        if ("additionalProperties" not in out and "patternProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def validators() -> dict[str, jsonschema.Draft7Validator]:
    found = {}
    for kind, path in CRDS.items():
        crd = _load(path)
        assert crd["spec"]["names"]["kind"] == kind
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        schema = strict(v1["schema"]["openAPIV3Schema"])
        schema["properties"]["metadata"] = OBJECT_META
        schema["properties"]["apiVersion"] = {"const": "ray.io/v1"}
        schema["properties"]["kind"] = {"const": kind}
        schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
        jsonschema.Draft7Validator.check_schema(schema)
        found[kind] = jsonschema.Draft7Validator(schema)
    return found


def errors(validators: dict, manifest: dict) -> list[str]:
    v = validators.get(manifest.get("kind"))
    if v is None:
        return [f"kind {manifest.get('kind')!r} is neither RayCluster nor RayJob"]
    return sorted(f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
                  for e in v.iter_errors(manifest))


def rendered(job_path: Path, *overrides: str) -> dict:
    job = load_job(job_path, list(overrides))
    return k8s.ray_job(job, str(job_path.relative_to(ROOT)), list(overrides))


def cluster_spec(manifest: dict) -> dict:
    return manifest["spec"]["rayClusterSpec"] if manifest["kind"] == "RayJob" else manifest["spec"]


def pod_templates(manifest: dict) -> list[dict]:
    spec = cluster_spec(manifest)
    pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    if manifest["kind"] == "RayJob" and "submitterPodTemplate" in manifest["spec"]:
        pods.append(manifest["spec"]["submitterPodTemplate"])
    return pods


def all_manifests() -> list[tuple[str, dict]]:
    files = [(p.name, _load(p)) for p in MANIFESTS]
    return files + [(f"render-k8s {p.name}", rendered(p)) for p in JOBS]


# --------------------------------------------------------------------------- schemas


def test_cluster_dir_holds_only_checked_files():
    assert MANIFESTS and VMS, "cluster/ needs RayCluster, RayJob and ray-vm files"
    checked = set(MANIFESTS) | set(VMS)
    assert {p for p in CLUSTER.glob("*.yaml")} == checked
    assert {p.name for p in CLUSTER.glob("ray-cluster.*.yaml")} >= {"ray-cluster.gpu.yaml"}


@pytest.mark.parametrize("name, manifest", all_manifests(), ids=lambda v: v
                         if isinstance(v, str) else "")
def test_manifest_is_valid_strictly(validators, name, manifest):
    assert errors(validators, manifest) == []


def test_strict_schema_catches_typos_and_wrong_types(validators):
    base = _load(CLUSTER / "ray-cluster.gpu.yaml")
    assert errors(validators, base) == []
    plain = jsonschema.Draft7Validator(
        [v for v in _load(CRDS["RayCluster"])["spec"]["versions"]
         if v["name"] == "v1"][0]["schema"]["openAPIV3Schema"])

    typo = copy.deepcopy(base)
    typo["spec"]["workerGroupSpecs"][0]["minReplica"] = 1  # minReplicas
    assert list(plain.iter_errors(typo)) == []  # the CRD alone lets it through ...
    found = errors(validators, typo)  # ... strict validation does not
    assert any("workerGroupSpecs/0" in e and "'minReplica'" in e for e in found), found

    deep = copy.deepcopy(base)
    deep["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolice"] = "x"
    assert any("containers/0" in e and "imagePullPolice" in e for e in errors(validators, deep))

    wrong = copy.deepcopy(base)
    wrong["spec"]["workerGroupSpecs"][1]["maxReplicas"] = "eight"
    assert errors(validators, wrong) == [
        "spec/workerGroupSpecs/1/maxReplicas: 'eight' is not of type 'integer'"]

    bad_enum = copy.deepcopy(base)
    bad_enum["spec"]["authOptions"]["mode"] = "tokens"
    assert any("authOptions/mode" in e for e in errors(validators, bad_enum))

    job = rendered(ROOT / "jobs" / "smollm2-gpu.yaml")
    job["spec"]["shutdownAfterJobFinish"] = True
    job["metadata"]["name"] = "Raykd_Job"
    found = errors(validators, job)
    assert any("shutdownAfterJobFinish'" in e for e in found), found
    assert any(e.startswith("metadata/name") for e in found), found


# --------------------------------------------------------------------------- content


@pytest.mark.parametrize("name, manifest", all_manifests(), ids=lambda v: v
                         if isinstance(v, str) else "")
def test_autoscaled_teacher_and_student_groups(name, manifest):
    spec = cluster_spec(manifest)
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["version"] == "v2"
    assert spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    assert spec["authOptions"]["mode"] == "token"
    assert spec["headGroupSpec"]["resources"] == {"CPU": "0"}  # no replica on the head
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"teacher", "student"}
    for role, g in groups.items():
        assert g["labels"][k8s.ROLE_LABEL] == role
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        assert g["idleTimeoutSeconds"] > 0


@pytest.mark.parametrize("name, manifest", all_manifests(), ids=lambda v: v
                         if isinstance(v, str) else "")
def test_pods_run_as_non_root_and_take_credentials_from_secrets(name, manifest):
    secretish = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", re.I)
    for pod in pod_templates(manifest):
        sec = pod["spec"]["securityContext"]
        assert sec["runAsNonRoot"] is True and sec["runAsUser"] != 0
        for c in pod["spec"]["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
            for env in c.get("env", []):
                if secretish.search(env["name"]):
                    assert "value" not in env, (name, env["name"])
                    assert env["valueFrom"]["secretKeyRef"]["name"], (name, env)
    # No literal credential anywhere in the file, whatever its key.
    text = yaml.safe_dump(manifest)
    assert not re.search(r"AKIA[0-9A-Z]{16}|hf_[A-Za-z0-9]{20,}", text)


def test_ray_jobs_run_their_job_file_and_clean_up():
    ray_jobs = sorted(CLUSTER.glob("ray-job.*.yaml"))
    assert ray_jobs
    for path in ray_jobs:
        job_name = path.name[len("ray-job."):-len(".yaml")]
        job_file = ROOT / "jobs" / f"{job_name}.yaml"
        assert job_file.exists(), f"{path.name} has no jobs/{job_name}.yaml"
        spec = _load(path)["spec"]
        assert spec["entrypoint"] == f"raykd run jobs/{job_name}.yaml"
        assert spec["shutdownAfterJobFinishes"] is True
        assert spec["ttlSecondsAfterFinished"] > 0 and spec["activeDeadlineSeconds"] > 0
        # The checked-in RayJob is exactly what render-k8s prints for its job: regenerate
        # it with `raykd render-k8s jobs/<job>.yaml > cluster/ray-job.<job>.yaml`.
        assert _load(path) == rendered(job_file), f"{path.name} is stale"


# --------------------------------------------------------------------------- placement


@pytest.mark.parametrize("job_path", JOBS, ids=lambda p: p.name)
def test_rendered_cluster_hosts_its_job(job_path):
    job = load_job(job_path)
    nodes = k8s.node_types(rendered(job_path)["spec"]["rayClusterSpec"])
    assert k8s.placement_problems(job, nodes) == []
    by_name = {n.name: n for n in nodes}
    assert by_name["teacher"].max_nodes == job.teacher.replicas.max
    assert by_name["student"].max_nodes == job.train.num_workers
    assert by_name["teacher"].resources["GPU"] >= job.teacher.num_gpus
    assert by_name["student"].resources["GPU"] == (1 if job.train.use_gpu else 0)


def test_render_follows_the_job_scaling_keys():
    path = ROOT / "jobs" / "smollm2-gpu.yaml"
    m = rendered(path, "teacher.replicas.max=6", "teacher.num_gpus=2",
                 "teacher.node_labels={pool: h100}", "train.num_workers=8",
                 "train.batch_size=128", "run.name=Big_Run")
    assert m["metadata"]["name"] == "raykd-big-run" == m["spec"]["jobId"]
    assert m["spec"]["entrypoint"] == (
        "raykd run jobs/smollm2-gpu.yaml teacher.replicas.max=6 teacher.num_gpus=2 "
        "'teacher.node_labels={pool: h100}' train.num_workers=8 train.batch_size=128 "
        "run.name=Big_Run")
    groups = {g["groupName"]: g for g in m["spec"]["rayClusterSpec"]["workerGroupSpecs"]}
    t, s = groups["teacher"], groups["student"]
    assert (t["minReplicas"], t["maxReplicas"]) == (2, 6)
    assert t["labels"] == {"raykd.io/role": "teacher", "pool": "h100"}
    assert t["resources"] == {"teacher": "1"}
    limits = t["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "2" and limits["cpu"] == "5"
    assert s["maxReplicas"] == 8 and s["resources"] == {"student": "1"}
    # A CPU-only job gets no GPUs and no GPU tolerations.
    cpu = rendered(ROOT / "jobs" / "quickstart.yaml")
    for g in cpu["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        assert "nvidia.com/gpu" not in g["template"]["spec"]["containers"][0]["resources"][
            "limits"]
        assert "tolerations" not in g["template"]["spec"]


def test_gpu_cluster_hosts_the_gpu_job_and_says_why_not():
    spec = _load(CLUSTER / "ray-cluster.gpu.yaml")["spec"]
    nodes = k8s.node_types(spec)
    path = ROOT / "jobs" / "smollm2-gpu.yaml"
    assert k8s.placement_problems(load_job(path), nodes) == []
    too_big = load_job(path, ["teacher.num_gpus=2"])
    (problem,) = k8s.placement_problems(too_big, nodes)
    assert problem.startswith("teacher:") and "GPU=2" in problem
    elsewhere = load_job(path, ["train.node_labels={raykd.io/role: trainer}"])
    (problem,) = k8s.placement_problems(elsewhere, nodes)
    assert problem.startswith("student:") and "fit 0 of 4" in problem


def test_render_k8s_cli_prints_a_valid_rayjob(validators):
    proc = subprocess.run(
        [sys.executable, "-m", "raykd.cli", "render-k8s", "jobs/smollm2-gpu.yaml",
         "--image", "example.com/raykd:1", "run.name=cli"],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("# raykd render-k8s jobs/smollm2-gpu.yaml run.name=cli\n")
    manifest = yaml.safe_load(proc.stdout)
    assert errors(validators, manifest) == []
    assert manifest["spec"]["entrypoint"] == "raykd run jobs/smollm2-gpu.yaml run.name=cli"
    images = {c["image"] for pod in pod_templates(manifest) for c in pod["spec"]["containers"]}
    assert images == {"example.com/raykd:1"}
    bad = subprocess.run([sys.executable, "-m", "raykd.cli", "render-k8s",
                          "jobs/smollm2-gpu.yaml", "teacher.replicas.max=0"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip() == ("raykd: error: jobs/smollm2-gpu.yaml: teacher.replicas.max: "
                                  "must be >= teacher.replicas.min (2), got 0")


# --------------------------------------------------------------------------- jobs, VMs


@pytest.mark.parametrize("job_path", JOBS, ids=lambda p: p.name)
def test_job_file_validates_and_names_its_command(job_path):
    load_job(job_path)
    first = job_path.read_text().splitlines()[0]
    assert re.fullmatch(rf"# raykd (run|submit) jobs/{re.escape(job_path.name)}( .*)?", first)


def ray_vm_schema() -> dict:
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json")
                        .read_text())
    return strict(schema)


@pytest.mark.parametrize("path", VMS, ids=lambda p: p.name)
def test_ray_vm_config_is_valid_and_hosts_the_gpu_job(path):
    config = _load(path)
    validator = jsonschema.Draft7Validator(ray_vm_schema())
    assert sorted(e.message for e in validator.iter_errors(config)) == []
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    assert types[config["head_node_type"]]["resources"].get("CPU") == 0
    nodes = [k8s.NodeType(name, {k: float(v) for k, v in t["resources"].items()},
                          t.get("labels", {}), t.get("max_workers", 0))
             for name, t in types.items() if name != config["head_node_type"]]
    assert k8s.placement_problems(load_job(ROOT / "jobs" / "smollm2-gpu.yaml"), nodes) == []
    assert sum(n.max_nodes for n in nodes) <= config["max_workers"]
    # A typo in a node type fails too.
    typo = copy.deepcopy(config)
    typo["available_node_types"]["teacher"]["max_worker"] = 2
    assert any("max_worker" in e.message for e in validator.iter_errors(typo))
