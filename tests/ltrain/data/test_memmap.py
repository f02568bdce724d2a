import json
import logging

import numpy as np
import pytest
import torch

from ltrain.data.config import DataConfig, DataConfigError
from ltrain.data.validate import validate_data_config
from ltrain.data.loader import DataStateError, build_loader
from ltrain.data.memmap import open_memmap
from ltrain.data.prepare import prepare


@pytest.fixture
def data(corpus, tmp_path):
    """A prepared directory of the corpus documents and its flat token array."""
    src, texts = corpus
    out = tmp_path / "data"
    prepare([str(src)], out)
    flat = np.concatenate([np.frombuffer(t.encode(), np.uint8).astype(np.int64).tolist() + [256] for t in texts])
    return out, flat, [len(t.encode()) + 1 for t in texts]


def cfg(path, **kw):
    return DataConfig(kind="memmap", path=str(path), **kw)


def test_packed_samples_are_overlapping_windows(data):
    path, flat, _ = data
    src = open_memmap(cfg(path, seq_len=100, doc_boundaries=False))
    assert src.num_samples == (len(flat) - 1) // 100 and src.vocab_size == 258
    for i in range(src.num_samples):
        tokens, docs = src.sample(i)
        assert tokens.dtype == np.int64 and np.array_equal(tokens, flat[i * 100 : i * 100 + 101]) and docs is None


@pytest.mark.parametrize("pack, expect", [(True, True), (False, False)])
def test_document_masking_is_on_by_default_where_documents_are_packed(data, pack, expect):
    """data.doc_boundaries=None (the default): packed rows carry doc_ids, pack=false rows
    (one document each) do not; an explicit value wins."""
    path, _, _ = data
    b = build_loader(cfg(path, seq_len=64, micro_batch_size=2, pack=pack), seed=0, dp_rank=0, dp_size=1).next_batch()
    assert ("doc_ids" in b) == expect
    if expect:
        assert (b["doc_ids"][:, 1:] >= b["doc_ids"][:, :-1]).all()
    off = build_loader(cfg(path, seq_len=64, micro_batch_size=2, pack=pack, doc_boundaries=False), seed=0,
                       dp_rank=0, dp_size=1).next_batch()
    assert "doc_ids" not in off


def test_unpacked_samples_are_document_prefixes(data):
    path, flat, lengths = data
    src = open_memmap(cfg(path, seq_len=700, pack=False))
    starts = np.cumsum([0, *lengths])[:-1]
    long_docs = [s for s, n in zip(starts, lengths) if n >= 701]
    assert src.num_samples == len(long_docs) == 2
    for i, s in enumerate(long_docs):
        assert np.array_equal(src.sample(i)[0], flat[s : s + 701])


def test_unpacked_with_no_long_enough_document_names_seq_len_and_longest(data):
    path, _, lengths = data
    with pytest.raises(DataConfigError, match=f"data.seq_len=5000 with data.pack=false .* has {max(lengths)}"):
        validate_data_config(cfg(path, seq_len=5000, pack=False))


def test_doc_boundaries_follow_docs_idx(data):
    path, _, lengths = data
    loader = build_loader(cfg(path, seq_len=64, micro_batch_size=4, doc_boundaries=True), seed=0, dp_rank=0, dp_size=1)
    bounds = np.cumsum(lengths)
    for _ in range(5):
        b = loader.next_batch()
        for row in range(4):
            ids, docs, pos, labels = (b[k][row] for k in ("input_ids", "doc_ids", "position_ids", "labels"))
            eos_at = torch.nonzero(ids == 256).flatten().tolist()
            # a new document starts right after each <eos>, and only there
            assert torch.nonzero(docs[1:] != docs[:-1]).flatten().tolist() == eos_at[: len(eos_at) - (eos_at[-1:] == [63])]
            assert all(pos[p + 1] == 0 for p in eos_at if p < 63)
            assert (labels[ids == 256] == -100).all() and (labels[ids != 256] >= 0).all()
    assert bounds[-1] > 64


def test_every_sample_once_per_epoch_across_ranks(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "n.txt").write_text("".join(f"{i:07d}," for i in range(300)))  # every window distinct
    prepare([str(tmp_path / "src")], tmp_path / "data")
    c = cfg(tmp_path / "data", seq_len=50, micro_batch_size=2)
    src = open_memmap(c)
    windows = {tuple(src.sample(i)[0][:-1].tolist()) for i in range(src.num_samples)}
    assert len(windows) == src.num_samples == 48
    loaders = [build_loader(c, seed=3, dp_rank=r, dp_size=3) for r in range(3)]
    seen = [tuple(row.tolist()) for _ in range(8) for l in loaders for row in l.next_batch()["input_ids"]]
    assert len(seen) == 48 and set(seen) == windows  # one epoch: each sample exactly once, on one rank


def test_state_round_trip_across_an_epoch_boundary(data):
    path, _, _ = data
    c = cfg(path, seq_len=40, micro_batch_size=3, doc_boundaries=True)
    ref = build_loader(c, seed=0, dp_rank=0, dp_size=1)
    full = [ref.next_batch() for _ in range(30)]  # > one epoch of ~60 samples
    first = build_loader(c, seed=0, dp_rank=0, dp_size=1)
    for _ in range(17):
        first.next_batch()
    resumed = build_loader(c, seed=0, dp_rank=0, dp_size=1)
    resumed.load_state_dict(first.state_dict())
    for want in full[17:]:
        got = resumed.next_batch()
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert resumed.sampler.epoch >= 1


def test_changed_data_is_refused(data, corpus):
    path, _, _ = data
    sd = build_loader(cfg(path), seed=0, dp_rank=0, dp_size=1).state_dict()
    src, _ = corpus
    (src / "a.txt").write_text("new content\n")
    prepare([str(src)], path)
    with pytest.raises(DataStateError, match="trained on dataset memmap-v1"):
        build_loader(cfg(path), seed=0, dp_rank=0, dp_size=1).load_state_dict(sd)


def test_seq_len_change_keeps_the_epoch_fraction(data, caplog):
    path, _, _ = data
    short = build_loader(cfg(path, seq_len=32, micro_batch_size=4), seed=0, dp_rank=0, dp_size=1)
    for _ in range(5):
        short.next_batch()
    long = build_loader(cfg(path, seq_len=128, micro_batch_size=1), seed=0, dp_rank=0, dp_size=1)
    with caplog.at_level(logging.WARNING, logger="ltrain.data"):
        long.load_state_dict(short.state_dict())
    assert "data.seq_len 32 -> 128" in caplog.text
    assert long.sampler.position == 20 * long.source.num_samples // short.source.num_samples
    assert long.next_batch()["input_ids"].shape == (1, 128)


@pytest.mark.parametrize(
    "damage, needle",
    [
        (lambda p: (p / "tokens.bin").write_bytes(b"\0" * 10), "tokens.bin has 10 bytes but meta.json says"),
        (lambda p: (p / "tokens.bin").unlink(), "tokens.bin is missing"),
        (lambda p: (p / "docs.idx").write_bytes(b"\0" * 8), "docs.idx has 8 bytes"),
        (lambda p: (p / "meta.json").unlink(), "has no meta.json"),
        (lambda p: (p / "meta.json").write_text(json.dumps({"version": 0})), "meta.json version 0 is not 1"),
    ],
)
def test_damaged_directory_is_a_one_line_error_naming_data_path(data, damage, needle):
    path, _, _ = data
    damage(path)
    with pytest.raises(DataConfigError) as e:
        validate_data_config(cfg(path))
    assert f"data.path={path}" in str(e.value) and needle in str(e.value) and "\n" not in str(e.value)


def test_missing_directory_and_too_long_seq_len(data, tmp_path):
    with pytest.raises(DataConfigError, match="does not exist"):
        validate_data_config(cfg(tmp_path / "nowhere"))
    path, flat, _ = data
    with pytest.raises(DataConfigError, match=f"data.seq_len=10000 needs 10001 tokens but data.path=.* has {len(flat)}"):
        validate_data_config(cfg(path, seq_len=10_000))
