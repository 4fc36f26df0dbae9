"""Sharded evaluation over several processes: ``torchrun --nproc_per_node=N -m geoalign.eval.cli eval ...`` or
``accelerate launch --num_processes N -m geoalign.eval.cli eval ...`` (both set RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT).

The protocol (file names: ``geoalign.eval.runner``; OUT is the predictions file):

1. Rank 0 handles ``--restart``, checks the settings against OUT's meta file and removes stale status files; its
   verdict is broadcast to every rank over a gloo process group that is created for this one collective and
   destroyed right after (a CPU object broadcast, whatever the device; no rank ever sits in a collective while
   others answer questions, so no collective timeout can cut a long run).
2. Each rank answers its shard on its own device (``cuda:LOCAL_RANK`` when CUDA is available, else the CPU) into
   its shard file, then writes its status file: done with its counts, or the error that stopped it.
3. Rank 0, after its own shard, waits for every other rank's status. A failed rank fails the job with its error;
   otherwise rank 0 merges the shards into OUT in dataset order and scores it.

A rank that raises writes its status and exits non-zero at once (torchrun and accelerate then stop the other ranks;
under another launcher rank 0 reports it when its own shard is done). A rank killed outright writes nothing: the
launcher reports it and stops the others. Every answer written so far stays in the shard files; rerunning the same
command, with any N, resumes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping


@dataclass(frozen=True)
class ProcessInfo:
    """This process's place in a (possibly one-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def sharded(self) -> bool:
        return self.world_size > 1

    def device(self, requested: str | None, cuda_available: bool | None = None) -> str | None:
        """The device this rank loads its model on: ``requested`` for one process; in a sharded run
        ``cuda:LOCAL_RANK`` when CUDA is available and nothing (or plain ``cuda``) was requested, the CPU when it is
        not, and an explicit device (``cuda:3``, ``cpu``) as given."""
        if not self.sharded or requested not in (None, "cuda"):
            return requested
        if requested is None:
            if cuda_available is None:
                import torch

                cuda_available = torch.cuda.is_available()
            if not cuda_available:
                return "cpu"
        return f"cuda:{self.local_rank}"


def process_info(env: Mapping[str, str] | None = None) -> ProcessInfo:
    """RANK / WORLD_SIZE / LOCAL_RANK as the launcher set them (one process when WORLD_SIZE is unset); a ValueError
    names what is inconsistent or missing."""
    env = os.environ if env is None else env

    def read(name: str, default: int) -> int:
        value = env.get(name, "")
        if value == "":
            return default
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"environment variable {name}={value!r} must be an integer") from None

    world = read("WORLD_SIZE", 1)
    rank = read("RANK", 0)
    local = read("LOCAL_RANK", rank)
    if world < 1:
        raise ValueError(f"WORLD_SIZE must be >= 1, got {world}")
    if not 0 <= rank < world:
        raise ValueError(f"RANK must be in [0, WORLD_SIZE={world}), got RANK={rank}")
    if local < 0:
        raise ValueError(f"LOCAL_RANK must be >= 0, got {local}")
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if world > 1 and not env.get(k)]
    if missing:
        raise ValueError(f"WORLD_SIZE={world} but {' and '.join(missing)} not set: start the ranks with torchrun "
                         "or accelerate launch")
    return ProcessInfo(rank, world, local)


def broadcast_from_rank0(obj: Any, info: ProcessInfo) -> Any:
    """Rank 0's ``obj`` on every rank (returned as is for one process): the run's one collective, over a gloo group
    created and destroyed here (an existing default group is used and kept)."""
    if not info.sharded:
        return obj
    import torch.distributed as dist

    own = not dist.is_initialized()
    if own:
        dist.init_process_group("gloo", rank=info.rank, world_size=info.world_size)
    try:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
    finally:
        if own:
            dist.destroy_process_group()
    return box[0]
