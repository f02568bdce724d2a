"""Synthetic long-context tasks over the byte tokenizer, generated on the fly.

Every sample is exactly seq_len+1 byte ids and ends with its answer, so the
answer span is always the last `answer_len` tokens. Sample `index` of seed
`seed` depends on nothing else (numpy Generator seeded with [seed, index]),
which makes the stream independent of process count and timing.

passkey: filler text with "The pass key is 12345. Remember it. ..." hidden at
    a depth (fraction of the filler before it), then the question.
recall:  "abcd:1234 efgh:5678 ... " pairs, filler if any room is left, then
    "\\nabcd:" and the value.
multikey (RULER's multi-key needle): several "The number for abcd is 12345. "
    needles in the filler, the queried one at a depth, the others anywhere, then
    "\\nWhat is the number for abcd? It is " and its value.
vartrack (RULER's variable tracking): a chain "VAR QWER = 12345. ... VAR ASDF =
    QWER. ... VAR ZXCV = ASDF. " scattered in order through the filler, then
    "\\nWhich variables hold 12345? " and the chain's names in order
    ("QWER ASDF ZXCV").

With data.doc_len_min > 0 a row packs several samples (documents) of log-uniform
random lengths in [doc_len_min, seq_len+1], each ending with its own answer.
"""

from __future__ import annotations

import hashlib
from typing import Callable

import numpy as np
import torch

from ltrain.data.config import TASKS, DataConfig, DataConfigError, non_negative_int, positive_int
from ltrain.data.tokenizer import BYTE_VOCAB_SIZE

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
_QUESTION = "What is the pass key? The pass key is "
_LETTERS = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", dtype=np.uint8)
_MK_NEEDLE = "The number for {key} is {value}. "
_MK_QUESTION = "\nWhat is the number for {key}? It is "
_VT_ASSIGN = "VAR {name} = {value}. "
_VT_QUESTION = "\nWhich variables hold {value}? "
NAME_LEN = 4  # letters of a multikey key / vartrack variable name

Probe = tuple[torch.Tensor, int, int]  # tokens LongTensor[seq_len+1], answer_start, answer_len


def _rng(seed_or_rng: int | np.random.Generator | tuple[int, ...]) -> np.random.Generator:
    if isinstance(seed_or_rng, np.random.Generator):
        return seed_or_rng
    return np.random.default_rng(seed_or_rng)


def _filler(n: int) -> str:
    reps = n // len(FILLER) + 1
    return (FILLER * reps)[:n]


def _passkey_text(rng: np.random.Generator, length: int, depth: float, digits: int) -> tuple[str, int]:
    key = "".join(str(d) for d in rng.integers(0, 10, digits))
    needle = _NEEDLE.format(key=key)
    room = length - len(needle) - len(_QUESTION) - digits
    if room < 0:
        raise ValueError(f"a passkey probe needs seq_len >= {length - room - 1}, got {length - 1}")
    before = round(depth * room)
    return _filler(before) + needle + _filler(room - before) + _QUESTION + key, digits


def _recall_text(rng: np.random.Generator, length: int, pairs: int, key_len: int, value_len: int) -> tuple[str, int]:
    pair_len = key_len + 1 + value_len + 1  # "key:value "
    query_len = 1 + key_len + 1 + value_len  # "\nkey:value"
    fit = (length - query_len) // pair_len
    n = min(fit, 26**key_len) if pairs == 0 else pairs
    if n < 1 or n > fit:
        raise ValueError(f"{max(n, 1)} recall pairs need seq_len >= {query_len + max(n, 1) * pair_len - 1}, got {length - 1}")
    # Distinct keys: draw key numbers without replacement, spell them base 26.
    codes = rng.choice(26**key_len, size=n, replace=False)
    keys = _LETTERS[(codes[:, None] // 26 ** np.arange(key_len - 1, -1, -1)) % 26]
    values = (rng.integers(0, 10, (n, value_len)) + ord("0")).astype(np.uint8)
    q = int(rng.integers(n))
    colon, space = np.full((n, 1), ord(":"), np.uint8), np.full((n, 1), ord(" "), np.uint8)
    body = np.hstack([keys, colon, values, space]).tobytes().decode("ascii")  # "key:value " rows
    query = f"\n{keys[q].tobytes().decode()}:{values[q].tobytes().decode()}"
    return body + _filler(length - len(body) - query_len) + query, value_len


def _names(rng: np.random.Generator, n: int, upper: bool = False) -> list[str]:
    """`n` distinct NAME_LEN-letter names: key numbers drawn without replacement, spelled base 26."""
    codes = rng.choice(26**NAME_LEN, size=n, replace=False)
    rows = _LETTERS[(codes[:, None] // 26 ** np.arange(NAME_LEN - 1, -1, -1)) % 26]
    names = [r.tobytes().decode("ascii") for r in rows]
    return [x.upper() for x in names] if upper else names


def _digits(rng: np.random.Generator, digits: int) -> str:
    return "".join(str(d) for d in rng.integers(0, 10, digits))


def _scatter(pieces: list[str], offsets: list[int], room: int) -> str:
    """`room` characters of filler with pieces[i] inserted at filler offset offsets[i] (offsets in
    non-decreasing order; the filler runs on unbroken around them)."""
    filler, out, prev = _filler(room), [], 0
    for piece, off in zip(pieces, offsets):
        out += [filler[prev:off], piece]
        prev = off
    return "".join(out) + filler[prev:]


def _multikey_need(keys: int, digits: int) -> int:
    """Characters of a multikey sample without filler (the needles, the question, the answer)."""
    name = "a" * NAME_LEN
    return keys * len(_MK_NEEDLE.format(key=name, value="0" * digits)) + len(_MK_QUESTION.format(key=name)) + digits


def _multikey_text(rng: np.random.Generator, length: int, depth: float, keys: int, digits: int) -> tuple[str, int]:
    room = length - _multikey_need(keys, digits)
    if room < 0 or keys < 1:
        raise ValueError(f"a multikey probe with {keys} keys needs seq_len >= {length - room - 1}, got {length - 1}")
    names = _names(rng, keys)
    values = [_digits(rng, digits) for _ in range(keys)]
    q = int(rng.integers(keys))
    offsets = [int(o) for o in rng.integers(0, room + 1, keys)]
    offsets[q] = round(depth * room)  # the queried needle at `depth`, the distractors anywhere
    order = sorted(range(keys), key=lambda i: (offsets[i], i))
    body = _scatter([_MK_NEEDLE.format(key=names[i], value=values[i]) for i in order],
                    [offsets[i] for i in order], room)
    return body + _MK_QUESTION.format(key=names[q]) + values[q], digits


def _vartrack_need(variables: int, digits: int) -> int:
    """Characters of a vartrack sample without filler (the assignments, the question, the answer)."""
    name = "A" * NAME_LEN
    return (len(_VT_ASSIGN.format(name=name, value="0" * digits))
            + (variables - 1) * len(_VT_ASSIGN.format(name=name, value=name))
            + len(_VT_QUESTION.format(value="0" * digits)) + variables * (NAME_LEN + 1) - 1)


def _vartrack_text(rng: np.random.Generator, length: int, variables: int, digits: int) -> tuple[str, int]:
    room = length - _vartrack_need(variables, digits)
    if room < 0 or variables < 1:
        raise ValueError(f"a vartrack probe with {variables} variables needs seq_len >= {length - room - 1}, "
                         f"got {length - 1}")
    names = _names(rng, variables, upper=True)
    value = _digits(rng, digits)
    offsets = sorted(int(o) for o in rng.integers(0, room + 1, variables))
    assigns = [_VT_ASSIGN.format(name=names[0], value=value)]
    assigns += [_VT_ASSIGN.format(name=names[i], value=names[i - 1]) for i in range(1, variables)]
    answer = " ".join(names)
    return _scatter(assigns, offsets, room) + _VT_QUESTION.format(value=value) + answer, len(answer)


def _encode(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("ascii"), dtype=np.uint8).astype(np.int64)


def make_passkey(seed_or_rng, seq_len: int, depth: float, digits: int = 5) -> Probe:
    """One passkey probe: (tokens LongTensor[seq_len+1], answer_start, answer_len)."""
    text, n = _passkey_text(_rng(seed_or_rng), seq_len + 1, depth, digits)
    return torch.from_numpy(_encode(text)), seq_len + 1 - n, n


def make_recall(seed_or_rng, seq_len: int, pairs: int = 0, key_len: int = 4, value_len: int = 4) -> Probe:
    """One associative-recall probe: (tokens LongTensor[seq_len+1], answer_start, answer_len)."""
    text, n = _recall_text(_rng(seed_or_rng), seq_len + 1, pairs, key_len, value_len)
    return torch.from_numpy(_encode(text)), seq_len + 1 - n, n


def make_multikey(seed_or_rng, seq_len: int, depth: float, keys: int = 4, digits: int = 5) -> Probe:
    """One multi-key needle probe: (tokens LongTensor[seq_len+1], answer_start, answer_len)."""
    text, n = _multikey_text(_rng(seed_or_rng), seq_len + 1, depth, keys, digits)
    return torch.from_numpy(_encode(text)), seq_len + 1 - n, n


def make_vartrack(seed_or_rng, seq_len: int, variables: int = 4, digits: int = 5) -> Probe:
    """One variable-tracking probe: (tokens LongTensor[seq_len+1], answer_start, answer_len)."""
    text, n = _vartrack_text(_rng(seed_or_rng), seq_len + 1, variables, digits)
    return torch.from_numpy(_encode(text)), seq_len + 1 - n, n


def min_seq_len(cfg: DataConfig) -> int:
    """Shortest data.seq_len the configured task can fill."""
    passkey = len(_NEEDLE.format(key="0" * cfg.passkey_digits)) + len(_QUESTION) + cfg.passkey_digits - 1
    pairs = max(cfg.recall_pairs, 1)
    recall = pairs * (cfg.recall_key_len + cfg.recall_value_len + 2) + cfg.recall_key_len + cfg.recall_value_len + 1
    if cfg.task == "multikey":
        return _multikey_need(cfg.multikey_keys, cfg.passkey_digits) - 1
    if cfg.task == "vartrack":
        return _vartrack_need(cfg.vartrack_vars, cfg.passkey_digits) - 1
    return {"passkey": passkey, "recall": recall, "mixed": max(passkey, recall)}[cfg.task]


class SyntheticSource:
    """An endless stream of task samples; `sample(i)` is a pure function of (seed, i)."""

    num_samples = None  # endless: the sampler walks indices in order
    vocab_size = BYTE_VOCAB_SIZE

    def __init__(self, cfg: DataConfig, seed: int):
        self.cfg = cfg
        self.seed = seed
        params = (cfg.task, cfg.passkey_digits, cfg.depth_min, cfg.depth_max,
                  cfg.recall_pairs, cfg.recall_key_len, cfg.recall_value_len)
        if cfg.task in ("multikey", "vartrack"):  # only these tasks' settings: older fingerprints stay as they were
            params += (cfg.multikey_keys,) if cfg.task == "multikey" else (cfg.vartrack_vars,)
        if cfg.doc_len_min:  # only packed rows' setting: older fingerprints stay as they were
            params += (("doc_len_min", cfg.doc_len_min),)
        self.fingerprint = "synthetic-v1:" + hashlib.sha256(repr(params).encode()).hexdigest()[:16]

    def sample(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """int64 tokens [seq_len+1] and, for packed rows (data.doc_len_min > 0), their
        document numbers [seq_len+1]; None: the row is one sample, one document."""
        cfg, rng = self.cfg, np.random.default_rng([self.seed, int(index)])
        if not cfg.doc_len_min:
            return _encode(self._text(rng, cfg.seq_len + 1)), None
        lengths = doc_lengths(rng, cfg.seq_len + 1, cfg.doc_len_min)
        text = "".join(self._text(rng, n) for n in lengths)
        return _encode(text), np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)

    def _text(self, rng: np.random.Generator, length: int) -> str:
        """One sample of the configured task, `length` characters ending with its answer."""
        cfg = self.cfg
        task = cfg.task if cfg.task != "mixed" else ("passkey", "recall")[int(rng.integers(2))]
        if task == "passkey":
            depth = rng.uniform(cfg.depth_min, cfg.depth_max)
            text, _ = _passkey_text(rng, length, depth, cfg.passkey_digits)
        elif task == "multikey":
            depth = rng.uniform(cfg.depth_min, cfg.depth_max)
            text, _ = _multikey_text(rng, length, depth, cfg.multikey_keys, cfg.passkey_digits)
        elif task == "vartrack":
            text, _ = _vartrack_text(rng, length, cfg.vartrack_vars, cfg.passkey_digits)
        else:
            text, _ = _recall_text(rng, length, cfg.recall_pairs, cfg.recall_key_len, cfg.recall_value_len)
        return text


def doc_lengths(rng: np.random.Generator, total: int, low: int) -> list[int]:
    """Lengths (each >= low, summing to total >= low) of the documents packed into one row: each
    drawn log-uniform in [low, what is left], so every scale up to the row is as likely; one that
    would leave less than `low` behind takes the rest."""
    out = []
    while total:
        n = total if total < 2 * low else int(round(np.exp(rng.uniform(np.log(low), np.log(total)))))
        n = total if total - n < low else n
        out.append(n)
        total -= n
    return out


@torch.no_grad()
def probe_accuracy(logits_fn: Callable[[torch.Tensor], torch.Tensor], probes: list[Probe], batch_size: int = 8) -> float:
    """Fraction of probes whose answer tokens are all the greedy (argmax) prediction.

    Teacher-forced: input_ids = tokens[:-1] [B, seq_len]; the logit at position
    p predicts token p+1. `logits_fn(input_ids[B, N]) -> logits[B, N, V]`.
    """
    correct = 0
    for i in range(0, len(probes), batch_size):
        chunk = probes[i : i + batch_size]
        tokens = torch.stack([t for t, _, _ in chunk])
        logits = logits_fn(tokens[:, :-1])
        for row, (t, start, n) in enumerate(chunk):
            pred = logits[row, start - 1 : start - 1 + n].argmax(-1).to(t.device)
            correct += bool(torch.equal(pred, t[start : start + n]))
    return correct / len(probes)


def passkey_accuracy(logits_fn, *, seq_len: int, n: int, depth: float, seed: int, digits: int = 5) -> float:
    """Greedy passkey retrieval accuracy over `n` probes at a fixed depth."""
    return probe_accuracy(logits_fn, [make_passkey((seed, i), seq_len, depth, digits) for i in range(n)])


def recall_accuracy(logits_fn, *, seq_len: int, n: int, seed: int, pairs: int = 0) -> float:
    """Greedy associative-recall accuracy over `n` probes."""
    return probe_accuracy(logits_fn, [make_recall((seed, i), seq_len, pairs) for i in range(n)])


def multikey_accuracy(logits_fn, *, seq_len: int, n: int, depth: float, seed: int, keys: int = 4,
                      digits: int = 5) -> float:
    """Greedy multi-key needle accuracy over `n` probes (seed, i) with the queried needle at `depth`:
    a probe counts when all `digits` value tokens of the queried key are the argmax prediction."""
    return probe_accuracy(logits_fn, [make_multikey((seed, i), seq_len, depth, keys, digits) for i in range(n)])


def vartrack_accuracy(logits_fn, *, seq_len: int, n: int, seed: int, variables: int = 4, digits: int = 5) -> float:
    """Greedy variable-tracking accuracy over `n` probes (seed, i): a probe counts when every token of
    the answer (the chain's variable names in order) is the argmax prediction."""
    return probe_accuracy(logits_fn, [make_vartrack((seed, i), seq_len, variables, digits) for i in range(n)])


def validate_synthetic(cfg: DataConfig) -> None:
    """DataConfigError naming the key for a synthetic-task setting that cannot work."""
    if cfg.task not in TASKS:
        raise DataConfigError(f"data.task={cfg.task!r} is not one of {', '.join(TASKS)}")
    for key in ("passkey_digits", "recall_key_len", "recall_value_len", "multikey_keys", "vartrack_vars"):
        positive_int(cfg, key)
    if not 0.0 <= cfg.depth_min <= cfg.depth_max <= 1.0:
        raise DataConfigError(
            f"data.depth_min={cfg.depth_min!r}, data.depth_max={cfg.depth_max!r}: "
            "need 0 <= depth_min <= depth_max <= 1"
        )
    non_negative_int(cfg, "recall_pairs", "as many as fit")
    if cfg.task != "passkey" and cfg.recall_pairs > 26**cfg.recall_key_len:
        raise DataConfigError(
            f"data.recall_pairs={cfg.recall_pairs} exceeds the {26**cfg.recall_key_len} distinct keys "
            f"of data.recall_key_len={cfg.recall_key_len}; raise recall_key_len"
        )
    for key in ("multikey_keys", "vartrack_vars"):
        if getattr(cfg, key) > 26**NAME_LEN:
            raise DataConfigError(f"data.{key}={getattr(cfg, key)} exceeds the {26**NAME_LEN} distinct "
                                  f"{NAME_LEN}-letter names")
    need = min_seq_len(cfg)
    if cfg.seq_len < need:
        raise DataConfigError(f"data.seq_len={cfg.seq_len} is too short for data.task={cfg.task} (needs >= {need})")
    non_negative_int(cfg, "doc_len_min", "one sample per row")
    if cfg.doc_len_min and not need + 1 <= cfg.doc_len_min <= cfg.seq_len + 1:
        raise DataConfigError(
            f"data.doc_len_min={cfg.doc_len_min} must lie in [{need + 1}, data.seq_len+1 = {cfg.seq_len + 1}]: "
            f"the shortest data.task={cfg.task} sample is {need + 1} tokens, and a document fits in its row "
            "(or 0 for one sample per row)")
