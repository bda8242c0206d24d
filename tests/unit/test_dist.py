"""kd3.dist: world info from launcher variables, rank splits, and the training step's all-reduce
(golden values in a 2-process gloo group on the loopback interface)."""

from __future__ import annotations

import os
import socket

import pytest
import torch

from kd3 import dist
from kd3.errors import Kd3Error
from kd3.training.loop import all_reduce_step, rank_rows


def test_world_comes_from_torchrun_then_srun_then_is_one_process():
    assert dist.world_from_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}) == dist.World(3, 8, 1, "torchrun")
    # torchrun's variables win over the Slurm allocation they run inside
    assert dist.world_from_env({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "SLURM_PROCID": "5",
                                "SLURM_NTASKS": "16"}).size == 2
    assert dist.world_from_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1"}) == \
        dist.World(5, 16, 1, "slurm")
    assert dist.world_from_env({}) == dist.World(0, 1, 0, "single")
    with pytest.raises(Kd3Error, match="rank 4 of world size 4"):
        dist.world_from_env({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(Kd3Error, match="WORLD_SIZE='two'"):
        dist.world_from_env({"WORLD_SIZE": "two"})


def test_one_process_helpers_are_the_identity():
    t = torch.tensor([1.0, float("nan")])
    assert dist.size() == 1 and dist.rank() == 0 and dist.is_main() and not dist.is_distributed()
    assert dist.all_reduce(t) is t and dist.merge_rows(t) is t and dist.all_gather_object(7) == [7]
    assert dist.main_decides(lambda: "decided") == "decided"
    assert dist.rank_split([1, 2, 3]) == [1, 2, 3]
    assert dist.device_for(torch.device("cpu")) == torch.device("cpu")


def test_rank_split_deals_items_in_turn_and_tolerates_more_ranks_than_items():
    items = list(range(7))
    shares = [dist.rank_split(items, r, 3) for r in range(3)]
    assert shares == [[0, 3, 6], [1, 4], [2, 5]]
    assert [dist.rank_split([0], r, 2) for r in range(2)] == [[0], []]


def test_rank_rows_are_disjoint_cover_the_epoch_and_change_between_epochs():
    rows = {f"u{i}": i for i in range(11)}
    shares = [rank_rows(rows, seed=0, epoch=0, rank=r, world=2) for r in range(2)]
    assert sorted(len(s) for s in shares) == [5, 6]
    assert set(shares[0]) | set(shares[1]) == set(rows) and not set(shares[0]) & set(shares[1])
    assert all(rows[u] == r for s in shares for u, r in s.items())
    assert rank_rows(rows, 0, 1, 0, 2) != shares[0]
    assert rank_rows(rows, 0, 0, 0, 1) == rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _step_worker(rank: int, port: int, results) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        w = torch.nn.Parameter(torch.zeros(2))
        unused = torch.nn.Parameter(torch.zeros(1))  # no gradient on any rank
        frozen = torch.nn.Parameter(torch.zeros(1), requires_grad=False)
        running = torch.tensor([10.0, 20.0]) if rank == 0 else torch.tensor([30.0, 40.0])
        count = torch.tensor(5)
        # rank 0: 2 samples, mean gradient [1, 2]; rank 1: 1 sample, gradient [4, 8], asks to stop
        w.grad = torch.tensor([1.0, 2.0]) if rank == 0 else torch.tensor([4.0, 8.0])
        stop = all_reduce_step([w, unused, frozen], [running, count], samples=2 if rank == 0 else 1, stop=rank == 1)
        first = (w.grad.tolist(), unused.grad, running.tolist(), int(count), stop)
        # a step where rank 1 has no rows: rank 0's gradient and buffers are taken as they are
        w.grad = torch.tensor([3.0, 3.0]) if rank == 0 else None
        running = torch.tensor([1.0, 1.0]) if rank == 0 else torch.tensor([99.0, 99.0])
        stop = all_reduce_step([w], [running], samples=3 if rank == 0 else 0, stop=False)
        results[rank] = (first, (w.grad.tolist(), running.tolist(), stop))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_all_reduce_step_gives_the_global_batch_mean_gradient_on_every_rank():
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(_step_worker, args=(_free_port(), results), nprocs=2)
    for rank in (0, 1):
        first, second = results[rank]
        # (2·[1, 2] + 1·[4, 8]) / 3; buffers averaged; the stop request reaches rank 0 too
        assert first == ([2.0, 4.0], None, [20.0, 30.0], 5, True)
        assert second == ([3.0, 3.0], [1.0, 1.0], False)
