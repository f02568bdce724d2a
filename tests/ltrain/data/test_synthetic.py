import numpy as np
import pytest
import torch

from ltrain.data.config import DataConfig
from ltrain.data.synthetic import (
    SyntheticSource,
    make_passkey,
    make_recall,
    min_seq_len,
    passkey_accuracy,
    probe_accuracy,
    recall_accuracy,
)


def text(tokens) -> str:
    return bytes(tokens.tolist()).decode("ascii")


@pytest.mark.parametrize("seq_len", [101, 256, 1000])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_passkey_structure(seq_len, depth):
    tokens, start, n = make_passkey(7, seq_len, depth)
    assert tokens.dtype == torch.long and tokens.shape == (seq_len + 1,)
    assert (start, n) == (seq_len + 1 - 5, 5)
    s = text(tokens)
    key = s[start:]
    assert key.isdigit() and s.endswith(f"What is the pass key? The pass key is {key}")
    needle = s.index(f"The pass key is {key}. Remember it.")
    filler = seq_len + 1 - len(f"The pass key is {key}. Remember it. {key} is the pass key. ") - len(
        "What is the pass key? The pass key is "
    ) - 5
    assert needle == round(depth * filler)


def test_passkey_too_short_is_refused():
    with pytest.raises(ValueError, match="needs seq_len >= 101, got 99"):
        make_passkey(0, 99, 0.5)


def test_recall_structure_and_answer_span():
    tokens, start, n = make_recall(3, 200)
    s = text(tokens)
    assert len(s) == 201 and n == 4 and start == 197
    body, query = s.rsplit("\n", 1)
    key, value = query.split(":")
    pairs = dict(p.split(":") for p in body.split(" ") if ":" in p)
    assert len(pairs) == (201 - len(query) - 1) // 10  # fills the context
    assert pairs[key] == value == s[start:]


def test_recall_with_few_pairs_puts_filler_before_the_query():
    s = text(make_recall(4, 200, pairs=3)[0])
    assert s.count(":") == 4 and "The grass is green." in s


def test_sample_is_function_of_seed_and_index_only():
    cfg = DataConfig(task="mixed", seq_len=300)
    a, b = SyntheticSource(cfg, seed=1), SyntheticSource(cfg, seed=1)
    assert np.array_equal(a.sample(5)[0], b.sample(5)[0])
    assert not np.array_equal(a.sample(5)[0], a.sample(6)[0])
    assert not np.array_equal(a.sample(5)[0], SyntheticSource(cfg, seed=2).sample(5)[0])
    kinds = {("pass key" in text(a.sample(i)[0])) for i in range(20)}
    assert kinds == {True, False}  # mixed draws both tasks


def test_fingerprint_depends_on_task_not_seq_len():
    fp = lambda **kw: SyntheticSource(DataConfig(**kw), seed=0).fingerprint
    assert fp(seq_len=256) == fp(seq_len=512)
    assert fp(task="passkey") != fp(task="recall")


def test_min_seq_len_is_tight():
    for task in ("passkey", "recall", "mixed"):
        cfg = DataConfig(task=task, seq_len=min_seq_len(DataConfig(task=task)))
        assert len(SyntheticSource(cfg, 0).sample(0)[0]) == cfg.seq_len + 1


def oracle(tokens_by_prefix):
    """A logits_fn that predicts each probe's next token perfectly."""

    def logits_fn(input_ids):
        b, n = input_ids.shape
        logits = torch.zeros(b, n, 258)
        for row in range(b):
            full = tokens_by_prefix[tuple(input_ids[row, :50].tolist())]
            logits[row, torch.arange(n), full[1:]] = 1.0
        return logits

    return logits_fn


def test_accuracy_is_one_for_an_oracle_and_zero_for_a_constant():
    probes = {tuple(t[:50].tolist()): t for t, _, _ in (make_passkey((9, i), 128, 0.3) for i in range(5))}
    assert passkey_accuracy(oracle(probes), seq_len=128, n=5, depth=0.3, seed=9) == 1.0
    assert passkey_accuracy(lambda x: torch.zeros(*x.shape, 258), seq_len=128, n=5, depth=0.3, seed=9) == 0.0
    probes = {tuple(t[:50].tolist()): t for t, _, _ in (make_recall((2, i), 128) for i in range(3))}
    assert recall_accuracy(oracle(probes), seq_len=128, n=3, seed=2) == 1.0


def test_one_wrong_answer_digit_fails_the_probe():
    tokens, start, n = make_passkey(1, 128, 0.5)

    def almost(input_ids):
        logits = torch.zeros(1, 128, 258)
        logits[0, torch.arange(128), tokens[1:]] = 1.0
        logits[0, start + n - 2, :] = 0.0  # last answer digit now argmaxes to 0
        return logits

    assert probe_accuracy(almost, [(tokens, start, n)]) == 0.0
