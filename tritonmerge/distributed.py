"""One merge across several processes on torch.distributed (``torchrun``, or ``--nproc N``).

What each process does, and why the output does not depend on how many there are:

- Rank 0 makes the plan and runs every check of a single-process run (options, backend, config,
  headers, inputs against the output, the output's state, free disk) and takes the output lock,
  which it holds to the end. The other ranks rebuild the plan from the same headers and must
  arrive at the same fingerprint; a refusal on rank 0 ends every rank without a second message.
- Whole output shards are dealt to ranks, balanced by estimated cost (``deal``); the shard
  layout comes from the plan, so names and contents do not depend on the number of ranks. Each
  rank reads only the tensors of its shards and writes only those shards.
- A whole-model analysis runs on every rank over its own tensors. Per-tensor results are
  exchanged whole (``gather``) and combined in the plan's tensor order, and integer histograms
  are summed (``sum_counts``, exact in any order): every rank takes the decisions a single
  process would, bit for bit.
- Finalize: every rank hands its shard records to rank 0 (which waits for all of them), rank 0
  writes the index, config, model card, decisions and checksums and commits.

Objects travel over a gloo group (they are small and live on the host); the default group is
NCCL on CUDA, gloo on CPU, and carries the histograms where they live on the GPU.
"""

from __future__ import annotations

import datetime
import heapq
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from .errors import ConfigError

WORLD_ENV = "WORLD_SIZE"
# a rank can wait this long for the others (a large analysis or shard on one rank is fine)
TIMEOUT = datetime.timedelta(hours=6)


@dataclass
class Ranks:
    """This process's place in the job, and the collectives the engine and analyses use."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    _objects: Any = field(default=None, repr=False)  # the gloo group for pickled objects
    _owns_group: bool = field(default=False, repr=False)  # this module initialised the default group

    @property
    def distributed(self) -> bool:
        return self._objects is not None

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def label(self) -> str:
        return f"rank {self.rank} of {self.world}"

    def broadcast(self, obj: Any = None) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj if self.leader else None]
        torch.distributed.broadcast_object_list(box, src=0, group=self._objects)
        return box[0]

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj, group=self._objects)
        return out

    def sum_counts(self, counts: torch.Tensor) -> torch.Tensor:
        """The element-wise sum over ranks of an integer tensor (exact in any order)."""
        if not self.distributed:
            return counts
        if counts.is_floating_point():
            raise TypeError("sum_counts adds integer counts only: a float sum would depend on the rank count")
        if counts.is_cuda and torch.distributed.get_backend() == "nccl":
            out = counts.clone()
            torch.distributed.all_reduce(out)
            return out
        out = counts.to("cpu", copy=True)
        torch.distributed.all_reduce(out, group=self._objects)
        return out.to(counts.device)

    def close(self) -> None:
        """Leave the job; a process group the caller had set up before is left as it was."""
        if self._owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


SINGLE = Ranks()


def launched() -> bool:
    """Whether this process is a rank of a job torchrun started (it sets RANK and WORLD_SIZE).
    A job of one rank takes the distributed path too: ``torchrun --nproc-per-node 1`` is how
    that path (and NCCL) is exercised on a single GPU."""
    return "RANK" in os.environ and WORLD_ENV in os.environ


def join(device: str) -> Ranks:
    """Join the job torchrun started: the default group on NCCL for ``cuda`` devices (each rank
    bound to its local GPU), gloo otherwise, plus a gloo group for objects."""
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ[WORLD_ENV])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    on_gpu = torch.device(device).type == "cuda"
    owns = not dist.is_initialized()  # else: embedded in a job that already has its group
    if owns:
        if on_gpu:
            gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if local_rank >= gpus:
                ranks_here = os.environ.get("LOCAL_WORLD_SIZE", str(local_rank + 1))
                raise ConfigError(
                    f"--device cuda puts one rank on each GPU: this machine has {gpus} GPU(s) for {ranks_here} "
                    "ranks; start at most that many per machine (--nproc / --nproc-per-node)"
                )
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if on_gpu else "gloo", timeout=TIMEOUT)
    gloo_default = dist.get_backend() == "gloo"
    objects = dist.group.WORLD if gloo_default else dist.new_group(backend="gloo", timeout=TIMEOUT)
    return Ranks(rank=rank, world=world, local_rank=local_rank, _objects=objects, _owns_group=owns)


def deal(costs: Sequence[float], world: int) -> list[int]:
    """Item i -> rank, balancing the summed cost per rank: the costliest item first, each to the
    least loaded rank so far (ties to the lower rank, so the result is the same everywhere)."""
    loads = [(0.0, r) for r in range(world)]
    heapq.heapify(loads)
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, r = heapq.heappop(loads)
        owner[i] = r
        heapq.heappush(loads, (load + costs[i], r))
    return owner
