"""benchmarks/doc_balance.py: the attended-block count against a brute-force token-level count
and the kernel's own skip (doc_split), zigzag's exact balance without documents, and rows that
are the loader's."""

import pytest
import torch

from benchmarks import doc_balance as db
from ltrain.data.prepare import prepare
from ltrain.kernels import BlockLayout
from ltrain.kernels.block_sparse_cpu import doc_split


def _random_docs(rows: int, n: int, gen: torch.Generator, step_max: int = 3) -> torch.Tensor:
    """Non-decreasing ids with short and long documents; steps of up to step_max (ids may skip)."""
    starts = torch.rand(rows, n, generator=gen) < torch.tensor([0.02, 0.1, 0.3])[torch.arange(rows) % 3, None]
    starts[:, 0] = False
    steps = torch.randint(1, step_max + 1, (rows, n), generator=gen) * starts
    return steps.cumsum(1) + torch.randint(0, 5, (rows, 1), generator=gen)


def _brute_force(doc_ids: torch.Tensor, bs: int) -> torch.Tensor:
    """[R, M, M]: query block qb attends key block kb iff some token pair j <= i with equal ids."""
    r, n = doc_ids.shape
    i = torch.arange(n)
    tok = (i[None, :] <= i[:, None]) & (doc_ids[:, :, None] == doc_ids[:, None, :])  # [R, i, j]
    return tok.view(r, n // bs, bs, n // bs, bs).any(4).any(2)


@pytest.mark.parametrize("bs, m", [(4, 24), (8, 16)])
def test_count_matches_token_level_brute_force_and_doc_split(bs, m):
    gen = torch.Generator().manual_seed(bs)
    docs = _random_docs(6, bs * m, gen)
    counts = db.attended_per_query_block(docs, m, bs)
    pairs = _brute_force(docs, bs)
    assert torch.equal(counts, pairs.sum(-1))
    # the kernel's skip: pairs kept by doc_split over the causal layout (clean + mixed)
    causal = BlockLayout.causal(m, m)
    clean, mixed = doc_split(causal, docs.int(), docs.int(), block_size=bs, causal=True, q_start=0, k_start=0)
    assert torch.equal(counts, (clean.counts + mixed.counts)[:, 0].long())
    for cp in (2, 4):
        for mode in db.MODES:
            blocks = db.rank_query_blocks(m, cp, mode)
            expect = torch.stack([pairs[:, blocks[r]].sum((1, 2)) for r in range(cp)], 1)
            assert torch.equal(db.per_rank(counts, cp, mode), expect)


def test_plain_causal_zigzag_is_balanced_and_contiguous_is_not():
    for m, cp in ((16, 2), (64, 4), (256, 8), (2048, 8)):
        plain = db.attended_per_query_block(None, m, 64)
        assert torch.equal(plain[0], torch.arange(1, m + 1))
        assert db.imbalance(db.per_rank(plain, cp, "zigzag")).item() == 0.0
        assert db.imbalance(db.per_rank(plain, cp, "contiguous")).item() > 0.4
    one_doc = torch.zeros(1, 64 * 16, dtype=torch.int32)  # one document: the plain count
    assert torch.equal(db.attended_per_query_block(one_doc, 16, 64), db.attended_per_query_block(None, 16, 64))


def test_rows_are_the_loaders(tmp_path):
    (tmp_path / "src").mkdir()
    for i, n in enumerate((30, 300, 5, 900, 70, 400)):
        (tmp_path / "src" / f"{i}.txt").write_text("x" * n)
    prepare([str(tmp_path / "src")], tmp_path / "data")
    doc_ids, indices, num_samples = db.load_rows(str(tmp_path / "data"), 128, 100, seed=0, chunk=3)
    assert num_samples == (1705 + 6 - 1) // 128 and len(indices) == num_samples == doc_ids.shape[0]
    assert sorted(indices) == list(range(num_samples))
    assert (doc_ids[:, 0] == 0).all() and (doc_ids.diff(dim=1) >= 0).all()
