"""Running raykd jobs on Ray clusters: the Jobs API client and KubeRay manifests.

- `jobs`: submit a job file to a cluster's Jobs API and watch, stop and list jobs.
- `auth`: the cluster address and Ray's token auth, resolved the way Ray resolves them.
- `ship`: the working directory a submission carries (the project plus the resolved job).
- `k8s`: RayJob / RayCluster manifests sized from a job's teacher and student scaling.

Nothing here imports Ray at module import time, so `raykd render-k8s` runs without it.
"""
