"""Run a function on N CPU processes joined by a gloo process group and collect rank 0's return value."""

from __future__ import annotations

import gc
import os
import pickle
import socket
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, result_path: str, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two processes share two cores
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = fn(*args)
        outcome = ("ok", result)
    except BaseException:  # noqa: BLE001 - the parent re-raises it with the traceback
        outcome = ("error", traceback.format_exc())
    finally:
        gc.collect()  # free what may hold gloo work before finalization, as torchtitan_ext.train.run does
        dist.destroy_process_group()
    if rank == 0 or outcome[0] == "error":
        with open(f"{result_path}.{rank}", "wb") as f:
            pickle.dump(outcome, f)


def run_distributed(fn, *args, world_size: int = 2):
    """fn(*args) runs on every rank (fn must be importable, i.e. module-level); returns rank 0's result."""
    with tempfile.TemporaryDirectory() as tmp:
        result_path = os.path.join(tmp, "result")
        mp.start_processes(_worker, args=(world_size, _free_port(), result_path, fn, args), nprocs=world_size,
                           start_method="spawn")
        for rank in range(world_size):
            if os.path.exists(f"{result_path}.{rank}"):
                status, value = pickle.load(open(f"{result_path}.{rank}", "rb"))
                if status == "error":
                    raise AssertionError(f"rank {rank} failed:\n{value}")
        return pickle.load(open(f"{result_path}.0", "rb"))[1]
