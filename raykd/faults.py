"""Fault injection at named points, for tests that must crash a process *exactly* there.

    RAYKD_FAULTS="checkpoint_write:step=8:rank=1:run=crashy"  (several: separated by ';')
    RAYKD_FAULTS_ONCE=/some/dir   each fault fires once (a marker file per fault)

A matching `maybe_fail(point, **where)` kills its process at once (os._exit), as a crash
would: no exception handler, no cleanup. Unset (always, outside tests) it does nothing.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

EXIT_CODE = 86


def maybe_fail(point: str, **where: object) -> None:
    spec = os.environ.get("RAYKD_FAULTS")
    if not spec:
        return
    for fault in spec.split(";"):
        name, *conditions = fault.strip().split(":")
        if name != point:
            continue
        wanted = dict(c.split("=", 1) for c in conditions if "=" in c)
        if any(str(where.get(k)) != v for k, v in wanted.items()):
            continue
        once = os.environ.get("RAYKD_FAULTS_ONCE")
        if once:
            marker = Path(once) / hashlib.sha1(fault.encode()).hexdigest()
            try:
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.touch(exist_ok=False)
            except FileExistsError:
                continue
        print(f"raykd: injected fault {fault!r}", flush=True)
        os._exit(EXIT_CODE)
