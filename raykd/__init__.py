"""raykd: distill a large teacher into a small student on Ray.

The public surface: load a job, validate it, run it.

    from raykd import load_job, run
    outcome = run(load_job("jobs/quickstart.yaml"))
"""

from raykd.config import JobConfig, load_job
from raykd.errors import ConfigError, UserError
from raykd.jit_ops import use_per_environment_dir

# Before any DeepSpeed op is JIT-built in this process: see raykd.jit_ops.
use_per_environment_dir()

__all__ = ["JobConfig", "load_job", "run", "ConfigError", "UserError"]
__version__ = "0.1.0"


def run(job: JobConfig):  # noqa: ANN201 - keeps Ray out of `import raykd`
    from raykd.runner import run as _run

    return _run(job)
