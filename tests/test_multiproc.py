import pytest
import torch
import torch.distributed as dist

from tests.multiproc import run_ranks


def _allreduce_rank(rank, world_size):
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return t.item()


def _fail_on_rank_one(rank, world_size):
    if rank == 1:
        raise ValueError("boom on purpose")
    return rank


@pytest.mark.parametrize("world_size", [2, 4])
def test_run_ranks_real_collective(world_size):
    assert run_ranks(_allreduce_rank, world_size) == [sum(range(world_size))] * world_size


def test_run_ranks_reports_rank_failure():
    with pytest.raises(AssertionError, match="boom on purpose"):
        run_ranks(_fail_on_rank_one, 2, timeout=60)
