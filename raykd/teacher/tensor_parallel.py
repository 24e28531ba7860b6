"""A tensor-parallel teacher inside one Ray actor: DeepSpeed inference AutoTP over
`tp_size` local ranks.

The actor process is rank 0: it owns the Ray Data batch. It starts ranks 1..N-1 as child
processes (`python -m raykd.teacher.tensor_parallel`, so nothing of the actor's own
__main__ is re-imported), joins them in a torch.distributed group over
127.0.0.1 (gloo on CPU, NCCL on GPU), and for each batch broadcasts the input ids so every
rank computes on the *same* tokens (AutoTP silently returns garbage otherwise); rank 0
keeps the logits.

Failure: if any rank dies, the replica cannot compute. A watchdog thread then kills the
whole actor process (os._exit), which Ray sees as an actor failure: Ray Data restarts the
actor (it runs pools with max_restarts=-1) and retries its in-flight batch elsewhere.
An exception would instead fail the dataset.
"""

from __future__ import annotations

import datetime
import glob
import json
import os
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import torch
import torch.distributed as dist

# DeepSpeed's shared-memory all-reduce on CPU reads LOCAL_SIZE and segfaults when it does
# not equal the ranks on the node (torchrun sets only LOCAL_WORLD_SIZE).
_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE",
        "LOCAL_WORLD_SIZE")
_TIMEOUT = datetime.timedelta(minutes=10)


def autotp_supported(model_dir: str) -> bool:
    """Whether DeepSpeed AutoTP can split this architecture (checked on a meta-device
    copy: no weights loaded)."""
    from deepspeed.module_inject.auto_tp import AutoTP
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    try:
        return bool(AutoTP.supported(model))
    except AssertionError:
        return False


class TPTeacher:
    """Callable like a model: `tp(input_ids) -> logits`, computed by `tp_size` ranks."""

    def __init__(self, model_dir: str, dtype: str, tp_size: int, on_gpu: bool, threads: int):
        self.tp_size = tp_size
        self.on_gpu = on_gpu
        port = _free_port()
        backend = "nccl" if on_gpu else "gloo"
        self.children = [
            subprocess.Popen([sys.executable, "-m", "raykd.teacher.tensor_parallel",
                              json.dumps({"rank": rank, "world": tp_size, "port": port,
                                          "model_dir": model_dir, "dtype": dtype,
                                          "on_gpu": on_gpu, "threads": threads,
                                          "backend": backend})])
            for rank in range(1, tp_size)
        ]
        _set_env(0, tp_size, port)
        if on_gpu:
            torch.cuda.set_device(0)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0,
                                world_size=tp_size, timeout=_TIMEOUT)
        self.model = _load_tp(model_dir, dtype, tp_size, on_gpu)
        _release_shm_workspace(0, port)
        self.device = torch.device("cuda", 0) if on_gpu else torch.device("cpu")
        threading.Thread(target=self._watch, daemon=True).start()

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        try:
            ids = input_ids.to(self.device, torch.long)
            header = torch.tensor(list(ids.shape), dtype=torch.long, device=self.device)
            dist.broadcast(header, src=0)
            dist.broadcast(ids, src=0)
            with torch.no_grad():
                return self.model(input_ids=ids).logits
        except RuntimeError:
            # A collective can notice a dead rank ("connection closed by peer") before the
            # watchdog does. Raised, that would be a user error that fails the dataset;
            # exiting instead is an actor failure, which Ray Data retries.
            deadline = time.time() + 5
            while time.time() < deadline:
                self._exit_if_a_rank_died()
                time.sleep(0.1)
            raise

    def _watch(self) -> None:
        while True:
            self._exit_if_a_rank_died()
            time.sleep(0.5)

    def _exit_if_a_rank_died(self) -> None:
        dead = [c for c in self.children if c.poll() is not None]
        if dead:
            print(f"raykd: tensor-parallel rank pid {dead[0].pid} exited with "
                  f"{dead[0].returncode}; replacing the whole replica", flush=True)
            for c in self.children:
                if c.poll() is None:
                    c.kill()
            os._exit(75)  # an actor failure: Ray restarts it and retries the batch


def _rank_main(rank: int, world: int, port: int, model_dir: str, dtype: str, on_gpu: bool,
               threads: int, backend: str) -> None:
    """Ranks 1..N-1: receive each batch's ids from rank 0, run the forward, repeat."""
    parent = os.getppid()
    _set_env(rank, world, port)
    torch.set_num_threads(threads)
    if on_gpu:
        torch.cuda.set_device(rank)
    device = torch.device("cuda", rank) if on_gpu else torch.device("cpu")
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=_TIMEOUT)
    model = _load_tp(model_dir, dtype, world, on_gpu)
    _release_shm_workspace(rank, port)
    try:
        while True:
            header = torch.zeros(2, dtype=torch.long, device=device)
            dist.broadcast(header, src=0)
            ids = torch.zeros(*header.tolist(), dtype=torch.long, device=device)
            dist.broadcast(ids, src=0)
            with torch.no_grad():
                model(input_ids=ids)
    except RuntimeError:
        if os.getppid() != parent:  # rank 0 (the actor) is gone: a normal end
            os._exit(0)
        raise


def _load_tp(model_dir: str, dtype: str, tp_size: int, on_gpu: bool) -> Any:
    import deepspeed

    from raykd.teacher.loading import load_model

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                   "float16": torch.float16}[dtype]
    model = load_model(model_dir, dtype, "cpu")
    engine = deepspeed.init_inference(model, tensor_parallel={"tp_size": tp_size},
                                      dtype=torch_dtype, replace_with_kernel_inject=False)
    module = engine.module
    if on_gpu:
        module = module.to(torch.device("cuda", torch.cuda.current_device()))
    return module.eval()


def _release_shm_workspace(rank: int, port: int) -> None:
    """Unlink this rank's DeepSpeed shared-memory all-reduce workspace (CPU only).

    DeepSpeed creates one ~66 MiB segment per rank in /dev/shm and never unlinks it, so
    every replica (and every restart of one) would leave world x 66 MiB of RAM behind
    until reboot; on Kubernetes /dev/shm counts against the pod's memory. A rank's
    init_inference returns once it has mapped every other rank's segment, so after a
    barrier no rank needs the names; the mappings live on until each process ends.
    """
    dist.barrier()
    addr = os.environ["MASTER_ADDR"]  # DeepSpeed names the segment by it (_set_env)
    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{addr}_{port}_{rank}"):
        os.unlink(path)  # only this rank unlinks its own segment


def _set_env(rank: int, world: int, port: int) -> None:
    values = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
              "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_SIZE": str(world),
              "LOCAL_WORLD_SIZE": str(world)}
    assert set(values) == set(_ENV)
    os.environ.update(values)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    args = json.loads(sys.argv[1])
    _rank_main(args["rank"], args["world"], args["port"], args["model_dir"], args["dtype"],
               args["on_gpu"], args["threads"], args["backend"])
