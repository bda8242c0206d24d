"""torchrun / Slurm multi-process runs: world info, the process group, collectives, rank splits.

One process (no launcher) is world size 1: every helper here is then a no-op or the identity, so a
laptop run is exactly what it was before kd3 knew of ranks. Under ``torchrun`` (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``) or ``srun`` without torchrun (``SLURM_PROCID``, ``SLURM_NTASKS``,
``SLURM_LOCALID``; then ``MASTER_ADDR``/``MASTER_PORT`` must be set, as pipelines/slurm does) the
ranks join one process group: nccl when this rank uses a CUDA device, gloo on CPU.

Rank 0 decides and writes (stage folders, meta.json, checkpoints, manifests); the other ranks read
its decisions (:func:`main_decides`) and wait at barriers. Work is split by rank with
:func:`rank_split` (contiguous-free, every ``world``-th item, so counts differ by at most one) and
every collective is entered by all ranks the same number of times, whatever each rank's share.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, TypeVar

import torch
import torch.distributed as tdist

from kd3.errors import Kd3Error

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    #: where the numbers came from: "torchrun", "slurm" or "single"
    launcher: str = "single"


def _int_env(names: Sequence[str], env: dict[str, str]) -> Optional[int]:
    for name in names:
        if env.get(name, "") != "":
            try:
                return int(env[name])
            except ValueError:
                raise Kd3Error(f"environment variable {name}={env[name]!r} is not an integer") from None
    return None


def world_from_env(env: Optional[dict[str, str]] = None) -> World:
    """This process's place in the run, from torchrun's variables, else srun's, else one process."""
    env = dict(os.environ if env is None else env)
    size = _int_env(["WORLD_SIZE"], env)
    if size is not None:
        rank = _int_env(["RANK"], env) or 0
        local = _int_env(["LOCAL_RANK"], env)
        world = World(rank, size, rank if local is None else local, "torchrun")
    elif _int_env(["SLURM_NTASKS"], env) is not None and _int_env(["SLURM_PROCID"], env) is not None:
        rank = _int_env(["SLURM_PROCID"], env)
        world = World(rank, _int_env(["SLURM_NTASKS"], env), _int_env(["SLURM_LOCALID"], env) or 0, "slurm")
    else:
        return World()
    if world.size < 1 or not 0 <= world.rank < world.size:
        raise Kd3Error(f"rank {world.rank} of world size {world.size} ({world.launcher} environment) is impossible")
    return world


def init(device_type: str = "cpu") -> World:
    """Join the process group when launched with more than one process (idempotent); returns the world.

    ``device_type`` is the device this rank computes on: nccl for "cuda", gloo otherwise."""
    world = world_from_env()
    if world.size == 1 or tdist.is_initialized():
        return world
    if world.launcher == "slurm":
        missing = [n for n in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(n)]
        if missing:
            raise Kd3Error(f"launched by srun with {world.size} tasks but {', '.join(missing)} is not set; export "
                           "MASTER_ADDR (the first node) and MASTER_PORT, or launch through torchrun")
        os.environ.update(RANK=str(world.rank), WORLD_SIZE=str(world.size), LOCAL_RANK=str(world.local_rank))
    if device_type == "cuda":
        torch.cuda.set_device(world.local_rank)
    backend = "nccl" if device_type == "cuda" else "gloo"
    tdist.init_process_group(backend, init_method="env://", rank=world.rank, world_size=world.size,
                             timeout=datetime.timedelta(minutes=int(os.environ.get("KD3_DIST_TIMEOUT_MIN", "120"))))
    return world


def shutdown() -> None:
    """Leave the process group (at the end of a command), so no rank exits with it open."""
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def size() -> int:
    return tdist.get_world_size() if tdist.is_available() and tdist.is_initialized() else 1


def rank() -> int:
    return tdist.get_rank() if tdist.is_available() and tdist.is_initialized() else 0


def is_distributed() -> bool:
    return size() > 1


def is_main() -> bool:
    return rank() == 0


def device_for(device: torch.device) -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` for a CUDA run with several processes, else ``device``."""
    if device.type == "cuda" and world_from_env().size > 1:
        return torch.device("cuda", world_from_env().local_rank)
    return device


def barrier() -> None:
    if is_distributed():
        tdist.barrier()


def _comm_device() -> torch.device:
    """Where collective tensors live: the rank's GPU under nccl, the CPU under gloo."""
    if is_distributed() and tdist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce ``tensor`` over the ranks ("sum" or "max"); returns the result on ``tensor``'s device
    (``tensor`` itself when there is one process)."""
    if not is_distributed():
        return tensor
    buffer = tensor.to(_comm_device()).clone()
    tdist.all_reduce(buffer, op={"sum": tdist.ReduceOp.SUM, "max": tdist.ReduceOp.MAX}[op])
    return buffer.to(tensor.device)


def all_gather_object(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order (``[obj]`` with one process)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * size()
    tdist.all_gather_object(out, obj)
    return out


def all_gather_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's ``tensor`` (any first-axis length per rank) concatenated in rank order."""
    if not is_distributed():
        return tensor
    return torch.cat([t.to(tensor.device) for t in all_gather_object(tensor.cpu())])


def broadcast_object(obj: T) -> T:
    """Rank 0's ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj if is_main() else None]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def merge_rows(values: torch.Tensor) -> torch.Tensor:
    """Rows [N, ...] that each rank filled for its own samples (NaN elsewhere) → every rank's rows on
    every rank; a row no rank filled stays NaN. Values are copied exactly (each row is the sum of one
    rank's value and zeros)."""
    if not is_distributed():
        return values
    flat = values.reshape(len(values), -1)
    filled = ~torch.isnan(flat).all(1)
    summed = all_reduce(torch.where(torch.isnan(flat), torch.zeros_like(flat), flat))
    counts = all_reduce(filled.to(torch.int32))
    if counts.numel() and int(counts.max()) > 1:
        raise Kd3Error("merge_rows: a row was filled by more than one rank (the rank split overlaps)")
    summed[counts == 0] = float("nan")
    return summed.reshape(values.shape)


def main_decides(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and hand its result to every rank. An error raised there is raised
    on every rank (the other ranks get a :class:`Kd3Error` with its message), so none waits forever."""
    if not is_distributed():
        return fn()
    result, error = None, None
    if is_main():
        try:
            result = fn()
        except BaseException as exc:  # noqa: BLE001 - told to the other ranks, then re-raised here
            error = exc
    message = None
    if error is not None:
        message = str(error) if isinstance(error, Kd3Error) else f"{type(error).__name__}: {error}"
    message = broadcast_object(message)
    if error is not None:
        raise error
    if message is not None:
        raise Kd3Error(f"rank 0: {message}")
    return broadcast_object(result)


def rank_split(items: Sequence[T], rank_: Optional[int] = None, world: Optional[int] = None) -> list[T]:
    """This rank's share of ``items``: every ``world``-th from position ``rank`` (shares differ by at most
    one item; a rank may get none). Further split by DataLoader worker inside the dataset
    (:class:`kd3.data.shards.ShardImages` takes every ``num_workers``-th shard of what it is given)."""
    r = rank() if rank_ is None else rank_
    w = size() if world is None else world
    return list(items)[r::w]
