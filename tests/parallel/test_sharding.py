import pytest
import torch

from ltrain.parallel.sharding import gather_sequence, shard_sequence
from tests.multiproc import run_ranks


def test_zigzag_rank_holds_chunks_r_and_2p_minus_1_minus_r():
    x = torch.arange(16)[None]
    assert shard_sequence(x, 0, 2).tolist() == [[0, 1, 2, 3, 12, 13, 14, 15]]
    assert shard_sequence(x, 1, 2).tolist() == [[4, 5, 6, 7, 8, 9, 10, 11]]
    assert shard_sequence(x, 1, 2, mode="contiguous").tolist() == [[8, 9, 10, 11, 12, 13, 14, 15]]


def test_zigzag_balances_causal_work_within_10_percent():
    n, cp = 4096, 4
    pos = torch.arange(n)[None]
    work = [int((shard_sequence(pos, r, cp) + 1).sum()) for r in range(cp)]  # keys visible per query
    assert max(work) / min(work) <= 1.10


def test_uneven_split_names_the_length():
    with pytest.raises(ValueError, match=r"shard_sequence \(zigzag, cp=2\): sequence length N = 10 must be divisible by 2 x cp x block_size = 4"):
        shard_sequence(torch.zeros(1, 10), 0, 2)


def _roundtrip(rank, world, mode):
    import torch.distributed as dist

    x = torch.arange(2 * 24).view(2, 24)
    got = gather_sequence(shard_sequence(x, rank, world, mode=mode), dist.group.WORLD, mode=mode)
    return torch.equal(got, x)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("mode", ["zigzag", "contiguous"])
def test_gather_inverts_shard_over_real_ranks(world, mode):
    assert all(run_ranks(_roundtrip, world, mode))


def test_gather_doc_ids_checks_the_shard_before_any_collective():
    from ltrain.parallel.sharding import gather_doc_ids

    q = torch.zeros(2, 4, 32, 8)
    assert gather_doc_ids(None, q, None, mode="zigzag", who="x") is None
    with pytest.raises(ValueError, match=r"ulysses_attention: doc_ids must be this rank's shard \[B, n\] = \[2, 32\] document ids"):
        gather_doc_ids(torch.zeros(2, 64, dtype=torch.int32), q, None, mode="zigzag", who="ulysses_attention")
    with pytest.raises(ValueError, match=r"lasp2h_attention: doc_ids must be an integer tensor \(int32 or int64\), got torch.float32"):
        gather_doc_ids(torch.zeros(2, 32), q, None, mode="zigzag", who="lasp2h_attention")
