"""Where DeepSpeed's JIT-compiled C++ ops are built: one directory per Python environment
and ninja.

DeepSpeed compiles `deepspeed_shm_comm` at the first `init_distributed` on a CPU (every
train worker's `deepspeed.initialize`, every tensor-parallel teacher), through torch's
cpp_extension, into one directory per Python version: ~/.cache/torch_extensions/py311_cpu.
Two things make a build there stale for the next process, which then rebuilds it (53
CPU-seconds: 28 s of wall time alone on 2 cores, up to ~100 s inside a train worker's
start-up, beside the teacher's), every time they alternate:

- its build file names the environment's own site-packages, so a second virtual
  environment on the machine (a CI checkout, a tox env, a fresh quickstart venv) and the
  first rebuild it for each other;
- torch runs whichever `ninja` is first on PATH, and ninja 1.13 (the `ninja` wheel, in an
  activated venv) and 1.11 (Debian's, when the venv's python is run without activating
  it) keep their build logs in formats that each reads as "command changed".

So the directory is keyed by both: each environment, with each ninja, builds once.

`import raykd` calls `use_per_environment_dir()`, so every process that runs raykd code
(the driver, the Ray Train workers, the teacher replicas) agrees on the directory before
DeepSpeed builds anything. A TORCH_EXTENSIONS_DIR set by the user is left as it is.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys

ENV = "TORCH_EXTENSIONS_DIR"


def per_environment_dir(prefix: str | None = None, ninja: str | None = None) -> str:
    """<cache>/torch_extensions/py<major><minor>-<hash of the environment's prefix and of
    the ninja on PATH>.

    The cache root is torch's own default (XDG_CACHE_HOME or ~/.cache), so the builds stay
    where users look for them and where `rm -rf ~/.cache/torch_extensions` clears them."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    env = os.path.realpath(prefix if prefix is not None else sys.prefix)
    found = ninja if ninja is not None else shutil.which("ninja")
    tool = os.path.realpath(found) if found else ""
    key = hashlib.sha256(f"{env}\0{tool}".encode()).hexdigest()[:12]
    return os.path.join(cache, "torch_extensions",
                        f"py{sys.version_info.major}{sys.version_info.minor}-{key}")


def use_per_environment_dir() -> None:
    """Point torch's JIT builds at this environment's directory, unless the user chose one."""
    if not os.environ.get(ENV):
        os.environ[ENV] = per_environment_dir()
