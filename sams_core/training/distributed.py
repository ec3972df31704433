"""Multi-process training on PyTorch's own DistributedDataParallel, launched by ``torchrun``.

DESIGN §7: one process per device, every process holds the whole model; each mini-batch is cut
into as many shards as there are processes and every process computes the loss of its shard;
DDP all-reduces the gradients, so all parameters, the per-perturbation globals (mask logits,
embeddings) included, stay identical on all ranks. Nothing here is a home-made scheme: the
helpers only start and query the ``torch.distributed`` process group.

Launch (``--devices N`` does exactly this)::

    python -m torch.distributed.run --standalone --nproc_per_node=N -m sams_core train ...

``torchrun`` sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``;
:func:`init_from_env` turns them into a process group: NCCL on CUDA, gloo on the CPU.
"""

from __future__ import annotations

import itertools
import os
import socket
import sys
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist

from sams_core.errors import SamsError

TRAIN_NOISE, VAL_NOISE = 0, 1


def active() -> bool:
    """Whether a ``torch.distributed`` process group is running in this process."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if active() else 0


def world_size() -> int:
    """Number of processes in the group (1 without a process group)."""
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Whether this process writes outputs and reports progress (rank 0)."""
    return rank() == 0


def launched_by_torchrun() -> bool:
    """Whether this process was started by ``torchrun`` / ``torch.distributed.run``."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


def backend_for(device: torch.device | str) -> str:
    """``nccl`` for CUDA devices, ``gloo`` for the CPU."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def rank_device(device: str | None = None) -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` for CUDA (the default when present), else CPU."""
    kind = torch.device(device).type if device else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind != "cuda":
        return torch.device(kind)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    n = torch.cuda.device_count()
    if local >= n:
        raise SamsError(
            f"Process {local} asks for GPU {local} but only {n} GPU(s) are visible. "
            f"Use --devices {max(n, 1)} or fewer."
        )
    return torch.device("cuda", local)


def init_from_env(device: str | None = None) -> torch.device:
    """Join the process group described by torchrun's environment; returns this rank's device.

    Safe to call twice. Raises :class:`SamsError` when the environment lacks torchrun's
    variables.
    """
    if not launched_by_torchrun():
        raise SamsError(
            "Not started by torchrun: RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT are not set. "
            "Launch with: python -m torch.distributed.run --standalone --nproc_per_node=N -m sams_core train ..."
        )
    dev = rank_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not active():
        dist.init_process_group(backend=backend_for(dev))
    return dev


def init_process_group(rank_: int, world: int, port: int, device: str = "cpu") -> torch.device:
    """Join a process group on this machine without torchrun (tests, notebooks)."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"] = str(rank_), str(world), str(rank_)
    return init_from_env(device)


def cleanup() -> None:
    """Leave the process group (no-op without one)."""
    if active():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place (no-op without a process group); returns ``t``."""
    if active() and world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def noise_seed(*keys: int) -> int:
    """A 63-bit seed that depends on every integer in ``keys`` (e.g. seed, step, shard)."""
    return int(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]).generate_state(2, np.uint32).view(np.uint64)[0] >> np.uint64(1))


def seed_noise(device: torch.device, seed: int) -> None:
    """Seed the default generators that a model on ``device`` draws its noise from."""
    torch.random.default_generator.manual_seed(seed)
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.default_generators[idx].manual_seed(seed)


def shard_bounds(n: int, n_shards: int) -> list[tuple[int, int]]:
    """``n`` positions cut into ``n_shards`` contiguous pieces, sizes differing by at most one."""
    edges = [(n * s) // n_shards for s in range(n_shards + 1)]
    return list(itertools.pairwise(edges))


def free_port() -> int:
    """A TCP port that is free on this machine now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun_command(n_processes: int, argv: Sequence[str]) -> list[str]:
    """The command that runs ``python -m sams_core ARGV`` in ``n_processes`` processes."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={int(n_processes)}",
        "-m", "sams_core", *argv,
    ]


__all__ = [
    "active",
    "all_reduce_sum",
    "backend_for",
    "cleanup",
    "free_port",
    "init_from_env",
    "init_process_group",
    "is_main",
    "launched_by_torchrun",
    "noise_seed",
    "rank",
    "rank_device",
    "seed_noise",
    "shard_bounds",
    "torchrun_command",
    "world_size",
]
