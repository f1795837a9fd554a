"""The process group and the (dp, ep) device mesh, from torchrun's environment variables.

Rank layout: mesh coordinate (d, e) is global rank d * ep + e, so an expert-parallel group is `ep`
consecutive ranks and a data-parallel group is every `ep`-th rank. Ranks with the same `e` hold the same
expert shard. Every collective runs under `timeout`, so a rank that dies makes the others fail with a
`DistributedError` naming the collective instead of hanging.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from moelab.config import MoelabError


class DistributedError(MoelabError):
    """A collective failed: another rank died, raised, or did not answer within the timeout."""


@dataclasses.dataclass(frozen=True)
class Parallel:
    """Where this process sits: its mesh and coordinates. `mesh` is None on a single process."""

    dp: int = 1
    ep: int = 1
    rank: int = 0
    mesh: DeviceMesh | None = None

    @property
    def world(self) -> int:
        return self.dp * self.ep

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep

    @property
    def dp_rank(self) -> int:
        return self.rank // self.ep

    def group(self, dim: str):
        """The process group along mesh dimension "dp" or "ep" (None on a single process)."""
        return None if self.mesh is None else self.mesh.get_group(dim)


SINGLE = Parallel()


def env_world() -> tuple[int, int, int]:
    """(rank, local rank, world size) as torchrun sets them; (0, 0, 1) when not launched by torchrun."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
            int(os.environ.get("WORLD_SIZE", 1)))


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def rank_device(device: torch.device) -> torch.device:
    """This process's device under torchrun: a CUDA device named without an index is the GPU of its
    LOCAL_RANK (the only one when the launcher left each process one visible GPU), made current at once so
    the model, the memory check and every later allocation land there and not all on GPU 0. A single
    process, another device kind or an explicit index is kept as named."""
    _, local_rank, world = env_world()
    if device.type != "cuda" or world == 1:
        return device
    if device.index is None:
        count = torch.cuda.device_count()
        if count > 1 and local_rank >= count:
            raise MoelabError(f"LOCAL_RANK {local_rank} has no GPU: this machine shows {count} CUDA devices "
                              "(launch at most one process per GPU)")
        device = torch.device("cuda", local_rank if count > 1 else 0)
    torch.cuda.set_device(device)
    return device


def init_parallel(dp: int, ep: int, timeout_s: float, device: torch.device | None = None) -> Parallel:
    """Join the process group torchrun described and build the (dp, ep) mesh; SINGLE when world is 1."""
    rank, _, world = env_world()
    if dp * ep != world:
        raise MoelabError(f"parallel.dp={dp} x parallel.ep={ep} = {dp * ep} must equal the "
                          f"{world} processes launched (WORLD_SIZE)")
    if world == 1:
        return SINGLE
    device = device or torch.device("cpu")
    if device.type == "cuda":
        device = rank_device(device)  # one GPU per process, chosen by torchrun's LOCAL_RANK
    if not dist.is_initialized():
        dist.init_process_group(backend_for(device), rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s))
    mesh = init_device_mesh(device.type, (dp, ep), mesh_dim_names=("dp", "ep"))
    return Parallel(dp=dp, ep=ep, rank=rank, mesh=mesh)


def is_main() -> bool:
    """Rank 0, or the only process: the one that logs and writes files."""
    return not dist.is_initialized() or dist.get_rank() == 0


@contextlib.contextmanager
def collective(name: str):
    """Turn a failed collective (a peer died or timed out) into an error that says what happened."""
    try:
        yield
    except (RuntimeError, dist.DistBackendError) as e:
        rank = dist.get_rank() if dist.is_initialized() else 0
        raise DistributedError(f"rank {rank}: collective {name!r} failed; another rank probably "
                               f"exited or stalled past the timeout ({type(e).__name__}: {e})") from e


def barrier() -> None:
    if dist.is_initialized():
        with collective("barrier"):
            dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
