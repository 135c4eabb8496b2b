"""Rank 0 writes the engine's files; the others wait at a barrier so nobody reads a folder before it exists."""

from __future__ import annotations

import torch.distributed as dist

__all__ = ["barrier", "is_writer"]


def is_writer() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
