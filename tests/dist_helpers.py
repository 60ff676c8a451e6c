"""Run a function on several CPU ranks (gloo) in fresh processes, and collect what each returns."""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, fn, world: int, init: str, out: str, args: tuple) -> None:
    os.environ.update(OMP_NUM_THREADS="1", RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        result = fn(*args)
        Path(out, f"rank{rank}.pkl").write_bytes(pickle.dumps(result))
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world: int, *args) -> list:
    """``fn(*args)`` on ``world`` ranks; returns each rank's (picklable) result, rank order.
    ``fn`` must be a module-level function (the processes are spawned)."""
    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{Path(tmp) / 'store'}"
        mp.start_processes(_entry, args=(fn, world, init, tmp, args), nprocs=world, start_method="spawn")
        return [pickle.loads(Path(tmp, f"rank{r}.pkl").read_bytes()) for r in range(world)]
