"""The process group torchrun describes, and which device each of its processes uses.

torchrun sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` for every process it starts (on one
machine or several, through its own rendezvous); without torchrun there is one process and no
group. Coordination (barriers) always goes through gloo, which needs no GPU; gradients travel over
NCCL when every process has a GPU of its own.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
from typing import List, Optional

import torch

CONTROL_TIMEOUT = datetime.timedelta(hours=6)  # a rank may edit for hours before the final barrier


@dataclasses.dataclass
class Workers:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    gradient_group: Optional[object] = None  # NCCL on GPUs, else the default (gloo) group

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def device(self) -> Optional[int]:
        """The GPU index a YAML's ``device`` must name in this process under torchrun (its local
        rank); None in a process alone or without GPUs: the YAML's own value stays (the plugin runs
        EasyEdit's ``cuda:`` code on the CPU there)."""
        return self.local_rank if self.distributed and torch.cuda.is_available() else None

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def average(self, tensors: List[torch.Tensor]) -> None:
        """Replace each tensor, in place, by its mean over the processes (one all-reduce)."""
        if not self.distributed or not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        torch.distributed.all_reduce(flat, group=self.gradient_group)
        flat /= self.world
        offset = 0
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def from_environment(gradients: bool = False) -> Workers:
    """This process's place in torchrun's group (a group of one without torchrun). ``gradients``:
    also set up the group tensors are averaged over (NCCL when CUDA is there, else gloo)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Workers()
    workers = Workers(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo", timeout=CONTROL_TIMEOUT)
    if torch.cuda.is_available():
        torch.cuda.set_device(workers.local_rank)
        if gradients:
            workers.gradient_group = torch.distributed.new_group(backend="nccl")
    return workers


def finish(workers: Workers) -> None:
    if workers.distributed and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
