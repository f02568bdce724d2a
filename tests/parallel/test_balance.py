"""parallel/balance.py: the documents split balances packed rows' attention work, and every
collective (ring, Ulysses, LASP-2, LASP-2H) run on such a split equals one process.

Document lengths come from the real stdlib corpus (the byte size of each .py file, what
ltrain-prepare's byte tokenizer makes of it), packed in a seeded order as the loader packs:
the distribution benchmarks/results/doc_balance-cpu.md measured zigzag on."""

from __future__ import annotations

import random
import sysconfig
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ltrain.kernels import BlockLayout, block_sparse_attention, lightning_attention
from ltrain.kernels.block_sparse_cpu import doc_split
from ltrain.kernels.s2 import s2_layout
from ltrain.parallel import lasp2_linear_attention, lasp2h_attention, ring_attention, ulysses_attention
from ltrain.parallel.balance import attended_blocks, balanced_split, document_split, folded_zigzag, rank_loads
from ltrain.parallel.sharding import Split, as_split, gather_sequence, shard_sequence
from tests.multiproc import run_ranks


def stdlib_rows(n: int, rows: int, seed: int = 0) -> torch.Tensor:
    """[rows, n] doc ids of rows packed from the stdlib's .py files in a seeded order
    (a document runs on into the next row, as the loader's packing does)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    sizes = sorted(p.stat().st_size for p in root.rglob("*.py") if "site-packages" not in p.parts)
    sizes = [s for s in sizes if s > 0]
    random.Random(seed).shuffle(sizes)
    ids, doc = [], 0
    for s in sizes:
        ids.extend([doc] * s)
        doc += 1
        if len(ids) >= n * rows:
            break
    out = torch.tensor(ids[: n * rows], dtype=torch.int32).view(rows, n)
    return out - out[:, :1]  # each row's ids from 0, like the loader's


def imbalance(loads: list[int]) -> float:
    return max(loads) / (sum(loads) / len(loads)) - 1


def chunk_costs(doc_ids: torch.Tensor, chunks: int, block: int) -> list[int]:
    return attended_blocks(doc_ids, doc_ids.shape[-1] // block, block).sum(0).view(chunks, -1).sum(-1).tolist()


# ---- the cost model ------------------------------------------------------------


def _random_docs(rows: int, n: int, gen: torch.Generator, step_max: int = 3) -> torch.Tensor:
    """Non-decreasing ids with short and long documents; steps of up to step_max (ids may skip)."""
    starts = torch.rand(rows, n, generator=gen) < torch.tensor([0.02, 0.1, 0.3])[torch.arange(rows) % 3, None]
    starts[:, 0] = False
    steps = torch.randint(1, step_max + 1, (rows, n), generator=gen) * starts
    return steps.cumsum(1) + torch.randint(0, 5, (rows, 1), generator=gen)


@pytest.mark.parametrize("bs, m", [(4, 24), (8, 16)])
def test_cost_is_the_block_pairs_the_kernels_attend(bs, m):
    """attended_blocks against a token-level brute force (some pair j <= i of one document)
    and against the kernel's own skip (doc_split's clean + mixed pairs of the causal layout)."""
    docs = _random_docs(6, bs * m, torch.Generator().manual_seed(bs))
    counts = attended_blocks(docs, m, bs)
    i = torch.arange(bs * m)
    tok = (i[None, :] <= i[:, None]) & (docs[:, :, None] == docs[:, None, :])
    assert torch.equal(counts, tok.view(6, m, bs, m, bs).any(4).any(2).sum(-1))
    clean, mixed = doc_split(BlockLayout.causal(m, m), docs.int(), docs.int(), block_size=bs, causal=True,
                             q_start=0, k_start=0)
    assert torch.equal(counts, (clean.counts + mixed.counts)[:, 0].long())
    assert torch.equal(attended_blocks(None, m, bs)[0], torch.arange(1, m + 1))


# ---- the split ---------------------------------------------------------------


@pytest.mark.parametrize("cp,m", [(2, 1), (2, 4), (4, 3), (8, 4)])
def test_balanced_split_gives_every_rank_m_chunks_of_a_partition(cp, m):
    costs = torch.randint(0, 1000, (cp * m,), generator=torch.Generator().manual_seed(cp * m)).tolist()
    split = balanced_split(costs, cp)
    assert split.cp == cp and split.m == m  # Split itself checks partition, ascending, equal counts
    # never worse than the trivial bound: the heaviest rank carries at most mean + the largest chunk
    assert max(rank_loads(costs, split)) <= sum(costs) / cp + max(costs)


def test_split_rejects_what_is_not_a_partition():
    for bad in [((0, 1), (1, 2)), ((0, 1), (2,)), ((1, 0), (2, 3)), ((0, 1), (2, 4))]:
        with pytest.raises(ValueError, match="each rank must hold the same number of chunks"):
            Split(bad)
    with pytest.raises(ValueError, match="a Split of 2 ranks used on a group of 4"):
        as_split(Split(((0, 3), (1, 2))), 4)


def test_one_document_rows_split_as_zigzag():
    """Without document skips the folded zigzag is exactly balanced, and the split keeps it."""
    docs = torch.zeros(2, 1024, dtype=torch.int32)
    for cp in (2, 4):
        split = document_split(docs, cp, 4, 16)
        assert split == folded_zigzag(cp, 4)
        assert imbalance(rank_loads(chunk_costs(docs, 4 * cp, 16), split)) < 0.01
    assert folded_zigzag(3, 2) == as_split("zigzag", 3)


@pytest.mark.parametrize("n", [8192, 32768])
def test_documents_split_balances_stdlib_rows_where_zigzag_does_not(n):
    """The 10% target of issue 18: mean imbalance (max rank / mean rank - 1) over stdlib rows
    below 10% at cp 2, 4, 8 with 4 chunks per rank, never worse than zigzag on any row,
    where zigzag's own exceeds 10% for cp >= 4."""
    rows = stdlib_rows(n, 24)
    for cp in (2, 4, 8):
        ours, zigzag = [], []
        for row in rows:
            split = document_split(row[None], cp, 4, 64)
            ours.append(imbalance(rank_loads(chunk_costs(row[None], 4 * cp, 64), split)))
            zigzag.append(imbalance(rank_loads(chunk_costs(row[None], 2 * cp, 64), as_split("zigzag", cp))))
            assert ours[-1] <= zigzag[-1] + 1e-9, (cp, ours[-1], zigzag[-1])
        mean, zz = sum(ours) / len(ours), sum(zigzag) / len(zigzag)
        assert mean < 0.10, (n, cp, mean, zz)
        if cp >= 4 and n == 32768:
            assert zz > 0.10, (n, cp, zz)  # the problem the split solves is present in these rows


def test_document_split_needs_whole_blocks_per_chunk():
    with pytest.raises(ValueError, match=r"parallel.cp x parallel.cp_split_chunks x block = 512"):
        document_split(torch.zeros(1, 1000, dtype=torch.int32), 2, 4, 64)


def test_shard_and_gather_round_trip_a_split():
    split = Split(((1, 2, 5, 6), (0, 3, 4, 7)))
    x = torch.arange(2 * 64).view(2, 64)
    parts = [shard_sequence(x, r, 2, mode=split) for r in range(2)]
    assert torch.equal(parts[0][:, :8], x[:, 8:16]) and torch.equal(parts[1][:, :8], x[:, :8])
    assert torch.equal(torch.cat(parts, 1).sort(1).values, x)


# ---- every collective on a balanced split equals one process ---------------------

BS, D = 16, 8


def _split_for(world_size: int, docs: torch.Tensor) -> Split:
    """A split far from zigzag: the balancer's, or (if that is the folded zigzag) a rotation of it."""
    split = document_split(docs, world_size, 4, BS)
    if split == folded_zigzag(world_size, 4):
        split = Split(tuple(tuple(sorted((c + 1) % (4 * world_size) for c in mine)) for mine in split.chunks))
    return split


def _packed_docs(n: int) -> torch.Tensor:
    """[2, n] ids: one long document then short ones (row 0), many short ones (row 1)."""
    lengths = ([n // 2 + 9, n // 8, 7], [n // 8 - 2, 5, n // 4 + 3, 17, n // 8])
    rows = []
    for row in lengths:
        ids = torch.repeat_interleave(torch.arange(len(row) + 1), torch.tensor([*row, n - sum(row)]))
        rows.append(ids[:n])
    return torch.stack(rows).to(torch.int32)


def _mask(docs: torch.Tensor) -> torch.Tensor:
    n = docs.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    return (causal & (docs[:, :, None] == docs[:, None, :]))[:, None]  # [B, 1, n, n]


def rel_max(a, b) -> float:
    """max |a - b| / max |b|: linear attention's outputs grow with the document, softmax's do not."""
    return ((a - b).abs().max() / b.abs().max()).item()


def _collectives_on_a_split(rank, world_size):
    n = 64 * world_size  # 4 chunks per rank of 16 tokens
    docs = _packed_docs(n)
    split = _split_for(world_size, docs)
    g = torch.Generator().manual_seed(11)
    H, Hkv = 4, 2
    q, do = (torch.randn(2, H, n, D, generator=g) for _ in range(2))
    k, v = (torch.randn(2, Hkv, n, D, generator=g) for _ in range(2))
    decay = torch.tensor([0.97, 0.9, 0.8, 1.0])
    s2 = s2_layout(H, n, block_size=BS, local_blocks=2, vert_stride=2)
    mask = _mask(docs)

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    cases = {
        "ring-dense": (lambda q, k, v, d: ring_attention(q, k, v, layout_fn=lambda m: BlockLayout.causal(m, m),
                                                         group=None, block_size=BS, mode=split, doc_ids=d), sdpa),
        "ring-s2": (lambda q, k, v, d: ring_attention(q, k, v, layout_fn=lambda m: s2, group=None, block_size=BS,
                                                      mode=split, doc_ids=d),
                    lambda q, k, v: block_sparse_attention(q, k, v, s2, block_size=BS, q_doc=docs, k_doc=docs)),
        "ulysses": (lambda q, k, v, d: ulysses_attention(
            q, k, v, group=None, mode=split, doc_ids=d,
            attn_fn=lambda q, k, v, head_start, doc_ids: F.scaled_dot_product_attention(
                q, k, v, attn_mask=_mask(doc_ids), enable_gqa=True)), sdpa),
        "lasp2h": (lambda q, k, v, d: lasp2h_attention(q, k, v, group=None, mode=split, doc_ids=d), sdpa),
        "lasp2": (lambda q, k, v, d: lasp2_linear_attention(q, k, v, decay, None, chunk_size=BS, mode=split,
                                                            doc_ids=d),
                  lambda q, k, v: lightning_attention(q, k, v, decay=decay, chunk_size=BS, doc_ids=docs)),
    }
    errors = {}
    for name, (parallel_fn, reference) in cases.items():
        kk, vv = (k, v) if name != "lasp2" else (k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))
        full = [t.clone().requires_grad_() for t in (q, kk, vv)]
        reference(*full).backward(do)

        def mine(t):
            return shard_sequence(t, rank, world_size, mode=split, dim=2)

        local = [mine(t).clone().requires_grad_() for t in (q, kk, vv)]
        out = parallel_fn(*local, shard_sequence(docs, rank, world_size, mode=split))
        out.backward(mine(do))
        got = gather_sequence(out, None, mode=split, dim=2)
        want = reference(*[t.detach() for t in full])
        errors[name] = max([rel_max(got, want)] + [rel_max(a.grad, mine(b.grad)) for a, b in zip(local, full)])
    return split.chunks, errors


@pytest.mark.parametrize("world_size", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_every_collective_on_a_documents_split_equals_one_process(world_size):
    for chunks, errors in run_ranks(_collectives_on_a_split, world_size):
        assert chunks != as_split("zigzag", world_size).chunks
        assert max(errors.values()) < 1e-5, (chunks, errors)
