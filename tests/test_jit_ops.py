"""DeepSpeed's JIT-built ops go to one directory per Python environment (raykd.jit_ops)."""

from __future__ import annotations

import os
import site
import subprocess
import sys
from pathlib import Path

from raykd import jit_ops

# What torch's cpp_extension (and so DeepSpeed's op builder) would build into, after
# `import raykd`, in a fresh interpreter.
PROBE = ("import raykd, os, torch.utils.cpp_extension as c; "
         "print(os.environ.get('TORCH_EXTENSIONS_DIR')); "
         "print(c._get_build_directory('deepspeed_shm_comm', False))")


def _probe(python: str, env: dict[str, str]) -> tuple[str, str]:
    out = subprocess.run([python, "-c", PROBE], env=env, capture_output=True, text=True,
                         check=True, timeout=120).stdout.split("\n")
    return out[0], out[1]


def _clean_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != jit_ops.ENV}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    return env


def test_one_directory_per_environment(tmp_path):
    a = jit_ops.per_environment_dir("/opt/envs/a", "/usr/bin/ninja")
    assert a == jit_ops.per_environment_dir("/opt/envs/a", "/usr/bin/ninja")
    assert a != jit_ops.per_environment_dir("/opt/envs/b", "/usr/bin/ninja")
    assert a != jit_ops.per_environment_dir("/opt/envs/a", "/opt/envs/a/bin/ninja")
    assert Path(a).parent.name == "torch_extensions"
    assert Path(a).name.startswith(f"py{sys.version_info.major}{sys.version_info.minor}-")


def test_a_directory_the_user_chose_is_kept(monkeypatch, tmp_path):
    monkeypatch.setenv(jit_ops.ENV, str(tmp_path / "mine"))
    jit_ops.use_per_environment_dir()
    assert os.environ[jit_ops.ENV] == str(tmp_path / "mine")
    monkeypatch.delenv(jit_ops.ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    jit_ops.use_per_environment_dir()
    assert os.environ[jit_ops.ENV] == jit_ops.per_environment_dir()
    assert os.environ[jit_ops.ENV].startswith(str(tmp_path / "cache"))


def test_two_environments_build_in_two_places(monkeypatch, tmp_path):
    """A second virtual environment (sharing this one's packages, so the probe runs in it)
    gets its own build directory; without raykd.jit_ops both would use
    <cache>/torch_extensions/py311_cpu and rebuild each other's ops."""
    env = _clean_env(tmp_path)
    here_env, here_build = _probe(sys.executable, env)
    monkeypatch.setenv("XDG_CACHE_HOME", env["XDG_CACHE_HOME"])
    assert here_env == jit_ops.per_environment_dir()
    assert here_build == os.path.join(here_env, "deepspeed_shm_comm")

    other = tmp_path / "other-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(other)], check=True,
                   timeout=120)
    other_site = next((other / "lib").glob("python*/site-packages"))
    (other_site / "shared.pth").write_text(
        "".join(f"import site; site.addsitedir({p!r})\n" for p in site.getsitepackages()))
    other_env, other_build = _probe(str(other / "bin" / "python"), env)
    assert other_env != here_env and other_build != here_build
    assert Path(other_env).parent == Path(here_env).parent  # both under torch_extensions

    # Another ninja first on PATH (as in an activated venv whose `ninja` wheel differs from
    # the system's): another directory, since each ninja reads the other's log as stale.
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "ninja").write_text("#!/bin/sh\nexit 0\n")
    (fake / "ninja").chmod(0o755)
    path = {**env, "PATH": f"{fake}{os.pathsep}{env.get('PATH', '')}"}
    other_ninja_env, _ = _probe(sys.executable, path)
    assert other_ninja_env not in (here_env, other_env)

    # A directory the user set is used as it is, in every environment.
    mine = str(tmp_path / "mine")
    assert _probe(sys.executable, {**env, jit_ops.ENV: mine}) == (
        mine, os.path.join(mine, "deepspeed_shm_comm"))
