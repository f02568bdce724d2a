"""benchmarks/doc_balance.py: per-rank counts by the real splits (zigzag, contiguous, the
documents split), zigzag's exact balance without documents, and rows that are the loader's.
(The attended-block count itself is tested in tests/parallel/test_balance.py.)"""

import torch

from benchmarks import doc_balance as db
from ltrain.data.prepare import prepare
from ltrain.parallel.balance import attended_blocks, document_split


def test_per_rank_counts_follow_the_real_splits():
    """zigzag / contiguous: shard_sequence's query blocks; documents: what document_split picks
    from the row's ids gives the same per-rank sums."""
    gen = torch.Generator().manual_seed(0)
    docs = (torch.rand(3, 64 * 32, generator=gen) < 0.003).cumsum(1).to(torch.int32)
    counts = attended_blocks(docs, 32, 64)
    for cp in (2, 4):
        for mode in ("zigzag", "contiguous"):
            blocks = db.rank_query_blocks(32, cp, mode)
            assert torch.equal(db.per_rank(counts, cp, mode), torch.stack([counts[:, b].sum(1) for b in blocks], 1))
        got = db.per_rank(counts, cp, "documents", 4)
        for row, loads in zip(docs, got):
            split = document_split(row[None], cp, 4, 64)
            blocks = torch.tensor([[b for c in mine for b in range(c * 32 // (4 * cp), (c + 1) * 32 // (4 * cp))]
                                   for mine in split.chunks])
            assert torch.equal(loads, attended_blocks(row[None], 32, 64)[0][blocks].sum(1))


def test_plain_causal_zigzag_is_balanced_and_contiguous_is_not():
    for m, cp in ((16, 2), (64, 4), (256, 8), (2048, 8)):
        plain = attended_blocks(None, m, 64)
        assert torch.equal(plain[0], torch.arange(1, m + 1))
        assert db.imbalance(db.per_rank(plain, cp, "zigzag")).item() == 0.0
        assert db.imbalance(db.per_rank(plain, cp, "contiguous")).item() > 0.4
    one_doc = torch.zeros(1, 64 * 16, dtype=torch.int32)  # one document: the plain count
    assert torch.equal(attended_blocks(one_doc, 16, 64), attended_blocks(None, 16, 64))


def test_rows_are_the_loaders(tmp_path):
    (tmp_path / "src").mkdir()
    for i, n in enumerate((30, 300, 5, 900, 70, 400)):
        (tmp_path / "src" / f"{i}.txt").write_text("x" * n)
    prepare([str(tmp_path / "src")], tmp_path / "data")
    doc_ids, indices, num_samples = db.load_rows(str(tmp_path / "data"), 128, 100, seed=0, chunk=3)
    assert num_samples == (1705 + 6 - 1) // 128 and len(indices) == num_samples == doc_ids.shape[0]
    assert sorted(indices) == list(range(num_samples))
    assert (doc_ids[:, 0] == 0).all() and (doc_ids.diff(dim=1) >= 0).all()
