"""The few collectives the trackers need: this process's place in a ``torch.distributed`` run, and a float gather.

Plain functions over ``torch.distributed``; they work unchanged in one process (no process group). Imports nothing
of hf_cim.
"""

from __future__ import annotations

import torch

__all__ = ["all_gather_floats", "world"]


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialized default process group; ``(0, 1)`` without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def all_gather_floats(values: list[float]) -> list[list[float]]:
    """Every rank's ``values`` (one list per rank, in rank order); ``[values]`` when not distributed.

    The lists must have the same length on every rank; they travel as float64 (on the current CUDA device under
    NCCL, else on the CPU).
    """
    rank, size = world()
    if size == 1:
        return [list(values)]
    device = torch.device("cpu")
    if torch.distributed.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    mine = torch.tensor(values, dtype=torch.float64, device=device)
    out = [torch.empty_like(mine) for _ in range(size)]
    torch.distributed.all_gather(out, mine)
    return [t.tolist() for t in out]
