import logging

import numpy as np
import pytest
import torch

from ltrain.data.config import DataConfig
from ltrain.data.loader import DataStateError, build_loader, make_batch


def take(loader, k):
    return [loader.next_batch() for _ in range(k)]


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_batch_shapes_and_next_token_labels():
    cfg = DataConfig(seq_len=128, micro_batch_size=3)
    loader = build_loader(cfg, seed=0, dp_rank=0, dp_size=1)
    assert loader.vocab_size == 258
    b = loader.next_batch()
    assert set(b) == {"input_ids", "labels"}
    for v in b.values():
        assert v.dtype == torch.long and v.shape == (3, 128)
    assert torch.equal(b["input_ids"][:, 1:], b["labels"][:, :-1])


@pytest.mark.parametrize("task", ["passkey", "recall", "mixed"])
def test_same_seed_same_batches_other_seed_other_batches(task):
    cfg = DataConfig(task=task, seq_len=128, micro_batch_size=2)
    a = take(build_loader(cfg, seed=4, dp_rank=0, dp_size=1), 3)
    b = take(build_loader(cfg, seed=4, dp_rank=0, dp_size=1), 3)
    c = take(build_loader(cfg, seed=5, dp_rank=0, dp_size=1), 3)
    assert all(same(x, y) for x, y in zip(a, b))
    assert not same(a[0], c[0])


def test_global_batch_is_independent_of_dp_size_and_rank_slices_are_disjoint():
    b = 2
    one = take(build_loader(DataConfig(seq_len=128, micro_batch_size=4 * b), seed=1, dp_rank=0, dp_size=1), 3)
    ranks = [take(build_loader(DataConfig(seq_len=128, micro_batch_size=b), seed=1, dp_rank=r, dp_size=4), 3) for r in range(4)]
    for step in range(3):
        parts = [ranks[r][step]["input_ids"] for r in range(4)]
        assert torch.equal(torch.cat(parts), one[step]["input_ids"])
        rows = {tuple(row.tolist()) for p in parts for row in p}
        assert len(rows) == 4 * b  # no sequence is given to two ranks


def test_state_round_trip_continues_exactly():
    cfg = DataConfig(task="mixed", seq_len=128, micro_batch_size=2)
    full = take(build_loader(cfg, seed=0, dp_rank=1, dp_size=2), 6)
    first = build_loader(cfg, seed=0, dp_rank=1, dp_size=2)
    take(first, 4)
    sd = first.state_dict()
    assert all(isinstance(v, (int, str)) for v in sd.values() if v is not None)
    resumed = build_loader(cfg, seed=0, dp_rank=1, dp_size=2)
    resumed.load_state_dict(sd)
    assert all(same(x, y) for x, y in zip(take(resumed, 2), full[4:]))


def test_dp_size_change_warns_and_continues_the_global_order(caplog):
    b = 2
    ref = take(build_loader(DataConfig(seq_len=128, micro_batch_size=2 * b), seed=0, dp_rank=0, dp_size=1), 4)
    two = build_loader(DataConfig(seq_len=128, micro_batch_size=b), seed=0, dp_rank=0, dp_size=2)
    take(two, 2)
    one = build_loader(DataConfig(seq_len=128, micro_batch_size=2 * b), seed=0, dp_rank=0, dp_size=1)
    with caplog.at_level(logging.WARNING, logger="ltrain.data"):
        one.load_state_dict(two.state_dict())
    assert "data-parallel size 2 -> 1" in caplog.text and "no data is dropped" in caplog.text
    assert all(same(x, y) for x, y in zip(take(one, 2), ref[2:]))


def test_changed_dataset_is_refused():
    sd = build_loader(DataConfig(task="passkey"), seed=0, dp_rank=0, dp_size=1).state_dict()
    other = build_loader(DataConfig(task="recall"), seed=0, dp_rank=0, dp_size=1)
    with pytest.raises(DataStateError, match="trained on dataset synthetic"):
        other.load_state_dict(sd)


def test_changed_seed_is_refused():
    sd = build_loader(DataConfig(), seed=0, dp_rank=0, dp_size=1).state_dict()
    with pytest.raises(DataStateError, match="resume with seed=0"):
        build_loader(DataConfig(), seed=1, dp_rank=0, dp_size=1).load_state_dict(sd)


def test_seq_len_change_continues_the_stream_and_logs(caplog):
    short = build_loader(DataConfig(seq_len=128, micro_batch_size=2), seed=0, dp_rank=0, dp_size=1)
    take(short, 3)
    long = build_loader(DataConfig(seq_len=512, micro_batch_size=2), seed=0, dp_rank=0, dp_size=1)
    with caplog.at_level(logging.WARNING, logger="ltrain.data"):
        long.load_state_dict(short.state_dict())
    assert "data.seq_len 128 -> 512" in caplog.text
    assert long.next_batch()["input_ids"].shape == (2, 512)
    assert long.sampler.position == 8


def test_make_batch_document_boundaries():
    tokens = np.arange(10, 20, dtype=np.int64)[None]  # one row, seq_len 9
    docs = np.array([[3, 3, 3, 4, 4, 5, 5, 5, 5, 5]])
    b = make_batch(tokens, docs)
    assert b["doc_ids"].tolist() == [[0, 0, 0, 1, 1, 2, 2, 2, 2]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    assert b["labels"].tolist() == [[11, 12, -100, 14, -100, 16, 17, 18, 19]]


def test_synthetic_rows_are_one_document_so_nothing_is_masked_by_default():
    b = build_loader(DataConfig(seq_len=128, micro_batch_size=2), seed=0, dp_rank=0, dp_size=1).next_batch()
    assert "doc_ids" not in b and "position_ids" not in b


def test_synthetic_doc_boundaries_are_one_document():
    b = build_loader(DataConfig(seq_len=128, micro_batch_size=2, doc_boundaries=True), seed=0, dp_rank=0, dp_size=1).next_batch()
    assert torch.equal(b["position_ids"], torch.arange(128).expand(2, 128))
    assert not b["doc_ids"].any() and (b["labels"] >= 0).all()


def test_default_task_is_learnable():
    """A bigram model's loss on the default stream falls well below uniform within a few steps."""
    torch.manual_seed(0)
    loader = build_loader(DataConfig(), seed=0, dp_rank=0, dp_size=1)
    model = torch.nn.Sequential(torch.nn.Embedding(loader.vocab_size, 16), torch.nn.Linear(16, loader.vocab_size))
    opt = torch.optim.Adam(model.parameters(), lr=5e-2)
    losses = []
    for _ in range(20):
        b = loader.next_batch()
        loss = torch.nn.functional.cross_entropy(model(b["input_ids"]).flatten(0, 1), b["labels"].flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 5.0 and sum(losses[-3:]) / 3 < 2.5


def test_accepts_the_composed_omegaconf_node():
    from omegaconf import OmegaConf

    node = OmegaConf.merge(OmegaConf.structured(DataConfig), {"seq_len": 128, "micro_batch_size": 2})
    a = build_loader(node, seed=0, dp_rank=0, dp_size=1).next_batch()
    b = build_loader(DataConfig(seq_len=128, micro_batch_size=2), seed=0, dp_rank=0, dp_size=1).next_batch()
    assert same(a, b)
