"""Document-aware context-parallel split: which chunks of packed rows each rank holds.

Zigzag (rank r holds chunks r and 2P-1-r of 2P) gives every rank the same
causal-attention work when a row is one document. With packed documents the
kernels skip every (query block, key block) pair whose documents cannot meet,
and what is left is uneven: on the stdlib corpus zigzag's slowest rank does
7-62% more than the mean at 8K-128K tokens and cp 2-8
(benchmarks/results/doc_balance-cpu.md). Like the field's packed-sequence
balancers (per-batch reassignment of sequence pieces to ranks by their
attention cost), `document_split` cuts the row into C = P m equal chunks and
gives each rank m of them so that the most loaded rank is as light as a
greedy assignment makes it. Every collective takes the result as its `mode`
(parallel.sharding.Split), so outputs and gradients are those of one process.

Cost of a query block qb (block_size tokens), what the kernels attend with
documents (kernels/block_sparse_cpu.py doc_split; the Triton kernels alike):
the key blocks kb <= qb whose doc-id ranges [first, last] meet qb's. Ids are
non-decreasing, so for kb <= qb that is last(kb) >= first(qb):

    cost(qb) = qb + 1 - #{kb : last(kb) < first(qb)}

summed over the batch's rows (one split serves the whole micro-batch: every row
of a rank's shard must hold the same chunks). A chunk's cost is the sum over
its query blocks; a rank's load is the sum over its chunks. The dense causal
cost stands for every softmax kind (S2 and InfLLM-V2 attend a fixed fraction
of it; linear layers cost the same per chunk under any split).

Assignment: longest processing time first (heaviest chunk to the lightest rank
that still has room for it), then swaps of one chunk between the heaviest rank
and another while a swap lowers the heaviest load. The folded zigzag (chunk c to
rank min(c mod 2P, 2P-1 - c mod 2P)) is the other candidate, kept on ties, so a
row of one document splits exactly as zigzag balances it. All of it is host
work on the loader's CPU ids (no device sync), deterministic, so every rank of a
context-parallel group computes the same split from the same batch.
"""

from __future__ import annotations

import torch

from .sharding import Split


def attended_blocks(doc_ids: torch.Tensor | None, num_blocks: int, block_size: int) -> torch.Tensor:
    """doc_ids [R, N] non-decreasing per row (None: one document) -> int64 [R, M] (or [1, M]):
    per query block qb, the key blocks kb <= qb whose doc-id ranges meet its own."""
    qb = torch.arange(num_blocks, dtype=torch.int64)
    if doc_ids is None:
        return (qb + 1)[None]
    # Only the block edges matter: slice before converting (a 128K row is 2048 edges, not 128K ids).
    first = doc_ids[:, ::block_size].to(torch.int64).contiguous()
    last = doc_ids[:, block_size - 1::block_size].to(torch.int64).contiguous()
    return qb + 1 - torch.searchsorted(last, first, side="left")


def rank_loads(chunk_costs: list[int], split: Split) -> list[int]:
    """The summed cost of each rank's chunks."""
    return [sum(chunk_costs[c] for c in mine) for mine in split.chunks]


def folded_zigzag(cp: int, m: int) -> Split:
    """Zigzag over C = cp m chunks: rank r holds, in each run of 2 cp chunks, chunks r and 2cp-1-r
    (m even; m = 2 is zigzag itself). Balances plain causal attention exactly."""
    owner = [min(c % (2 * cp), 2 * cp - 1 - c % (2 * cp)) for c in range(cp * m)]
    return Split(tuple(tuple(c for c in range(cp * m) if owner[c] == r) for r in range(cp)))


def balanced_split(chunk_costs: list[int], cp: int) -> Split:
    """chunk_costs: [C] the cost of each of C = cp m chunks -> the Split that gives each rank m
    chunks with the lowest max load found (LPT, then improving swaps; folded zigzag on ties)."""
    C = len(chunk_costs)
    if C % cp or not C:
        raise ValueError(f"balanced_split: {C} chunks do not divide over cp = {cp} ranks")
    m = C // cp
    ranks: list[list[int]] = [[] for _ in range(cp)]
    loads = [0] * cp
    for c in sorted(range(C), key=lambda c: (-chunk_costs[c], c)):
        r = min((r for r in range(cp) if len(ranks[r]) < m), key=lambda r: (loads[r], r))
        ranks[r].append(c)
        loads[r] += chunk_costs[c]
    _improve_by_swaps(ranks, loads, chunk_costs)
    greedy = Split(tuple(tuple(sorted(r)) for r in ranks))
    if m % 2 == 0:
        zigzag = folded_zigzag(cp, m)
        if max(rank_loads(chunk_costs, zigzag)) <= max(loads):
            return zigzag
    return greedy


def _improve_by_swaps(ranks: list[list[int]], loads: list[int], cost: list[int]) -> None:
    """Swap one chunk of the heaviest rank with one of another rank while that lowers the heavier
    of the two below the current max (each swap strictly lowers the pair's max: it terminates)."""
    while True:
        top = max(range(len(loads)), key=lambda r: (loads[r], -r))
        best = None  # (new max of the pair, top's chunk index, other rank, its chunk index)
        for o in range(len(loads)):
            if o == top:
                continue
            for i, a in enumerate(ranks[top]):
                for j, b in enumerate(ranks[o]):
                    d = cost[a] - cost[b]
                    if d <= 0:
                        continue
                    pair_max = max(loads[top] - d, loads[o] + d)
                    if pair_max < loads[top] and (best is None or pair_max < best[0]):
                        best = (pair_max, i, o, j)
        if best is None:
            return
        _, i, o, j = best
        a, b = ranks[top][i], ranks[o][j]
        ranks[top][i], ranks[o][j] = b, a
        loads[top] += cost[b] - cost[a]
        loads[o] += cost[a] - cost[b]


def document_split(doc_ids: torch.Tensor, cp: int, chunks_per_rank: int, block_size: int) -> Split:
    """doc_ids: [B, N] the batch's packed rows' document ids (host tensor, non-decreasing per
    row) -> the Split of C = cp x chunks_per_rank chunks that balances their attended blocks.
    N must be a multiple of C x block_size (the config checks it: parallel.cp_split_chunks)."""
    C = cp * chunks_per_rank
    N = doc_ids.shape[-1]
    if N % (C * block_size):
        raise ValueError(f"document_split: N = {N} tokens do not cut into {C} chunks of whole {block_size}-token "
                         f"blocks (parallel.cp x parallel.cp_split_chunks x block = {C * block_size})")
    per_block = attended_blocks(doc_ids.reshape(-1, N), N // block_size, block_size).sum(0)
    return balanced_split(per_block.view(C, -1).sum(-1).tolist(), cp)
