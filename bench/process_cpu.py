"""Where the CPU goes during bench.speed's streamed run (c): CPU seconds per process kind.

    python -m bench.process_cpu

Runs (c) alone (one epoch, embedded Ray with 3 logical CPUs, as bench.speed) and reads
every process's user + system time from /proc every 2 s; processes are grouped by their
Ray name (`ray::RayTrainWorker`, `ray::MapWorker(MapBatches(TeacherReplica))...`) or
their command line. Prints the epoch time, the run's wall time and the CPU seconds of each
group, largest first: what shares the two cores with the teacher and the student.
"""

from __future__ import annotations

import collections
import os
import threading
import time

from bench.common import scratch


def cpu_seconds() -> dict[int, tuple[float, str]]:
    """pid -> (CPU seconds so far, group name) for every process that can be read."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/cmdline") as f:
                cmd = f.read().replace("\0", " ").strip()
        except OSError:
            continue  # gone between listing and reading
        name = cmd.split(" ")[0] if cmd.startswith("ray::") else cmd[:70]
        out[int(pid)] = ((int(fields[11]) + int(fields[12])) / tick, name)
    return out


def main() -> None:
    import ray

    from bench.speed import job
    from raykd.config import job_from_dict
    from raykd.runner import run

    totals: collections.Counter[str] = collections.Counter()
    done = threading.Event()

    def sample() -> None:
        before = cpu_seconds()
        while not done.wait(2.0):
            now = cpu_seconds()
            for pid, (seconds, name) in now.items():
                totals[name] += seconds - before.get(pid, (0.0, ""))[0]
            before = now

    out = scratch("raykd-cpu-")
    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False)
    sampler = threading.Thread(target=sample, daemon=True)
    started = time.time()
    sampler.start()
    try:
        summary = run(job_from_dict(job(out, "c", ["macbeth"], 128)), log=lambda _: None).summary
        wall = time.time() - started
    finally:
        done.set()
        sampler.join()
        ray.shutdown()
    print(f"epoch {summary['epoch0_s']:.1f} s, run {wall:.1f} s on {os.cpu_count()} cores; "
          f"CPU seconds by process:")
    for name, seconds in totals.most_common(25):
        print(f"{seconds:8.1f}  {name}")


if __name__ == "__main__":
    main()
