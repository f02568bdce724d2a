import re

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


# ------------------------------------------------------------------ multikey and vartrack (RULER-style)
import re  # noqa: E402

from ltrain.data.synthetic import (  # noqa: E402
    make_multikey,
    make_vartrack,
    multikey_accuracy,
    vartrack_accuracy,
)


def read_multikey(s: str) -> str:
    """The answer a reader of the sequence (without its answer) gives: the queried key's value."""
    key = re.search(r"\nWhat is the number for ([a-z]+)\? It is \d*$", s).group(1)
    found = re.findall(rf"The number for {key} is (\d+)\. ", s)
    assert len(found) == 1
    return found[0]


def read_vartrack(s: str) -> str:
    """Follow the assignments from the queried number: the chain's names in order."""
    body, query = s.rsplit("\n", 1)
    value = re.fullmatch(r"Which variables hold (\d+)\? [A-Z ]*", query).group(1)
    assigns = re.findall(r"VAR ([A-Z]+) = ([A-Z]+|\d+)\. ", body)
    held, names = {value}, []
    for name, rhs in assigns:
        if rhs in held:
            held.add(name)
            names.append(name)
    return " ".join(names)


@pytest.mark.parametrize("seq_len", [160, 256, 1000])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("keys", [1, 4])
def test_multikey_structure_and_oracle_reader(seq_len, depth, keys):
    for i in range(5):
        tokens, start, n = make_multikey((7, i), seq_len, depth, keys)
        assert tokens.dtype == torch.long and tokens.shape == (seq_len + 1,)
        s = text(tokens)
        assert (start, n) == (seq_len + 1 - 5, 5) and s[start:].isdigit()
        assert s.count("The number for ") == keys and len(set(re.findall(r"for ([a-z]+) is", s))) == keys
        assert read_multikey(s) == s[start:]
        # the queried needle at `depth` of the filler
        key = re.search(r"\nWhat is the number for ([a-z]+)\?", s).group(1)
        needle, pos = f"The number for {key} is {s[start:]}. ", s.index(f"The number for {key} is ")
        before = s[:pos]
        for other in re.findall(r"The number for [a-z]+ is \d+\. ", before):
            before = before.replace(other, "", 1)
        room = seq_len + 1 - keys * len(needle) - len(f"\nWhat is the number for {key}? It is ") - 5
        assert len(before) == round(depth * room)


@pytest.mark.parametrize("seq_len", [116, 256, 1000])
@pytest.mark.parametrize("variables", [1, 4, 6])
def test_vartrack_structure_and_oracle_reader(seq_len, variables):
    if seq_len == 116 and variables == 6:
        with pytest.raises(ValueError, match="a vartrack probe with 6 variables needs seq_len >= 160, got 116"):
            make_vartrack(0, seq_len, variables)
        return
    for i in range(5):
        tokens, start, n = make_vartrack((3, i), seq_len, variables)
        assert tokens.shape == (seq_len + 1,)
        s = text(tokens)
        assert n == 5 * variables - 1 and start == seq_len + 1 - n
        assert s.count("VAR ") == variables and read_vartrack(s) == s[start:]


def test_new_tasks_are_deterministic_and_refuse_short_lengths():
    for make in (lambda seed: make_multikey(seed, 300, 0.4), lambda seed: make_vartrack(seed, 300)):
        assert torch.equal(make((1, 2))[0], make((1, 2))[0])
        assert not torch.equal(make((1, 2))[0], make((1, 3))[0])
        assert not torch.equal(make((1, 2))[0], make((2, 2))[0])
    with pytest.raises(ValueError, match="a multikey probe with 4 keys needs seq_len >= 160, got 159"):
        make_multikey(0, 159, 0.5)


@pytest.mark.parametrize("task", ["multikey", "vartrack"])
def test_new_tasks_as_training_streams(task):
    from ltrain.data.config import DataConfigError
    from ltrain.data.synthetic import validate_synthetic

    cfg = DataConfig(task=task, seq_len=min_seq_len(DataConfig(task=task)))
    validate_synthetic(cfg)
    src = SyntheticSource(cfg, 0)
    samples = [src.sample(i)[0] for i in range(10)]
    assert all(len(x) == cfg.seq_len + 1 for x in samples)
    assert np.array_equal(samples[3], SyntheticSource(cfg, 0).sample(3)[0])
    reader = read_multikey if task == "multikey" else read_vartrack
    answer_len = 5 if task == "multikey" else 19
    for x in samples:
        s = bytes(x.tolist()).decode("ascii")
        assert reader(s) == s[-answer_len:]
    with pytest.raises(DataConfigError, match=f"data.seq_len={cfg.seq_len - 1} is too short for data.task={task}"):
        validate_synthetic(DataConfig(task=task, seq_len=cfg.seq_len - 1))
    key = "multikey_keys" if task == "multikey" else "vartrack_vars"
    with pytest.raises(DataConfigError, match=f"data.{key}=0 must be a positive integer"):
        validate_synthetic(DataConfig(task=task, seq_len=1000, **{key: 0}))
    # a task's own settings change its fingerprint; the existing tasks' fingerprints do not see them
    fp = lambda **kw: SyntheticSource(DataConfig(**kw), seed=0).fingerprint
    assert fp(task=task) != fp(task=task, **{key: 2})
    assert fp(task="passkey") == fp(task="passkey", **{key: 2})


def full_oracle(probes):
    """A logits_fn that predicts each probe's next token perfectly (keyed by the whole input: the
    filler before the first needle is the same in many probes)."""
    by_input = {tuple(t[:-1].tolist()): t for t, _, _ in probes}

    def logits_fn(input_ids):
        b, n = input_ids.shape
        logits = torch.zeros(b, n, 258)
        for row in range(b):
            logits[row, torch.arange(n), by_input[tuple(input_ids[row].tolist())][1:]] = 1.0
        return logits

    return logits_fn


def test_new_task_accuracy_is_one_for_an_oracle_and_zero_for_a_constant():
    zero = lambda x: torch.zeros(*x.shape, 258)
    probes = [make_multikey((9, i), 256, 0.3, 3) for i in range(4)]
    assert multikey_accuracy(full_oracle(probes), seq_len=256, n=4, depth=0.3, seed=9, keys=3) == 1.0
    assert multikey_accuracy(zero, seq_len=256, n=4, depth=0.3, seed=9, keys=3) == 0.0
    probes = [make_vartrack((2, i), 200, 3) for i in range(4)]
    assert vartrack_accuracy(full_oracle(probes), seq_len=200, n=4, seed=2, variables=3) == 1.0
    assert vartrack_accuracy(zero, seq_len=200, n=4, seed=2, variables=3) == 0.0


@pytest.mark.parametrize("task", ["passkey", "multikey", "mixed"])
def test_packed_rows_hold_whole_samples_of_log_uniform_lengths(task):
    from ltrain.data.synthetic import doc_lengths, validate_synthetic

    low = min_seq_len(DataConfig(task=task)) + 1
    cfg = DataConfig(task=task, seq_len=1023, doc_len_min=low)
    validate_synthetic(cfg)
    src = SyntheticSource(cfg, seed=3)
    counts = []
    for i in range(30):
        tokens, docs = src.sample(i)
        assert tokens.shape == docs.shape == (1024,) and docs[0] == 0
        assert (np.diff(docs) >= 0).all() and (np.diff(docs) <= 1).all()
        pieces = [text(tokens[docs == d]) for d in range(docs[-1] + 1)]
        assert min(map(len, pieces)) >= low
        for s in pieces:  # every document is one whole sample, ending with its own answer
            if task == "multikey":
                assert read_multikey(s) == s[-5:]
            elif "What is the pass key?" in s:
                assert s[-5:].isdigit() and f"The pass key is {s[-5:]}. Remember it." in s
            else:  # recall (mixed): the queried key's value
                body, query = s.rsplit("\n", 1)
                assert dict(p.split(":") for p in body.split(" ") if ":" in p)[query[:4]] == query[5:] == s[-4:]
        counts.append(len(pieces))
        assert np.array_equal(tokens, SyntheticSource(cfg, seed=3).sample(i)[0])
    assert max(counts) > 1  # rows do pack several documents
    # log-uniform: documents shorter than sqrt(low * row) are about as common as longer ones
    rng = np.random.default_rng(0)
    lengths = [n for _ in range(2000) for n in doc_lengths(rng, 4097, 128)]
    assert sum(lengths) == 2000 * 4097 and min(lengths) >= 128
    short = np.mean([n < (128 * 4097) ** 0.5 for n in lengths])
    assert 0.4 < short < 0.8, short


def test_packed_rows_are_masked_per_document_and_fingerprinted():
    from ltrain.data.config import DataConfigError, doc_masking
    from ltrain.data.loader import build_loader
    from ltrain.data.synthetic import validate_synthetic

    cfg = DataConfig(seq_len=511, doc_len_min=128, micro_batch_size=4)
    assert doc_masking(cfg) and not doc_masking(DataConfig(seq_len=511, doc_len_min=128, doc_boundaries=False))
    b = build_loader(DataConfig(seq_len=512, doc_len_min=128, micro_batch_size=4), seed=0, dp_rank=0,
                     dp_size=1).next_batch()
    assert b["doc_ids"].max() > 0
    starts = b["position_ids"] == 0
    assert (b["labels"][:, :-1][starts[:, 1:]] == -100).all()  # no label crosses into the next document
    fp = lambda **kw: SyntheticSource(DataConfig(**kw), seed=0).fingerprint
    assert fp(doc_len_min=128) != fp() == fp(doc_len_min=0)
    for value, needle in [(-1, "data.doc_len_min=-1 must be an integer >= 0"),
                          (50, "data.doc_len_min=50 must lie in [102, data.seq_len+1 = 512]"),
                          (600, "data.doc_len_min=600 must lie in [102,")]:
        with pytest.raises(DataConfigError, match=re.escape(needle)):
            validate_synthetic(DataConfig(seq_len=511, doc_len_min=value))
