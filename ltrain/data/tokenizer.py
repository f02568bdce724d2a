"""Tokenizers: a byte-level one that needs no files, or a local Hugging Face tokenizer.json (the file, or
a Hugging Face checkpoint directory holding it).

Byte tokenizer ids: 0..255 are the UTF-8 bytes themselves, 256 is <eos>
(appended after every document), 257 is <pad> (reserved for padding ragged
evaluation batches; training batches are never padded). vocab_size = 258.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

BYTE_EOS = 256
BYTE_PAD = 257
BYTE_VOCAB_SIZE = 258

# Names Hugging Face tokenizers commonly give their end-of-document token.
_EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>", "[SEP]")


class Tokenizer(Protocol):
    name: str  # "byte", or the tokenizer.json path
    vocab_size: int
    eos_id: int

    def encode(self, data: bytes) -> np.ndarray:
        """UTF-8 document bytes -> int64 ids [n] (no <eos>); raises UnicodeDecodeError."""

    def decode(self, ids: Sequence[int]) -> str: ...

    def identity(self) -> str:
        """A string that changes whenever the id mapping could change."""


class ByteTokenizer:
    name = "byte"
    vocab_size = BYTE_VOCAB_SIZE
    eos_id = BYTE_EOS
    pad_id = BYTE_PAD

    def encode(self, data: bytes) -> np.ndarray:
        data.decode("utf-8")  # same acceptance rule as the HF tokenizer: text only
        return np.frombuffer(data, dtype=np.uint8).astype(np.int64)

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")

    def identity(self) -> str:
        return "byte-v1"


class HFTokenizer:
    """A local tokenizer.json loaded through the `tokenizers` library (no download)."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as _HF

        self.name = str(Path(path).resolve())
        self._tok = _HF.from_file(self.name)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        eos = next((self._tok.token_to_id(n) for n in _EOS_NAMES if self._tok.token_to_id(n) is not None), None)
        if eos is None:
            raise ValueError(f"tokenizer {self.name} has none of the end-of-document tokens {', '.join(_EOS_NAMES)}")
        self.eos_id = eos
        self._sha = hashlib.sha256(Path(self.name).read_bytes()).hexdigest()

    def encode(self, data: bytes) -> np.ndarray:
        ids = self._tok.encode(data.decode("utf-8"), add_special_tokens=False).ids
        return np.asarray(ids, dtype=np.int64)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def identity(self) -> str:
        return f"hf-sha256:{self._sha}"


def load_tokenizer(spec: str) -> ByteTokenizer | HFTokenizer:
    """`"byte"`, a path to a Hugging Face tokenizer.json, or a directory holding one (a Hugging Face
    checkpoint or tokenizer directory, as save_pretrained writes it)."""
    if spec == "byte":
        return ByteTokenizer()
    if Path(spec).is_dir():
        if not (Path(spec) / "tokenizer.json").is_file():
            raise ValueError(f"--tokenizer {spec!r} is a directory without a tokenizer.json (a Hugging Face "
                             "checkpoint directory saved with a fast tokenizer holds one)")
        return HFTokenizer(Path(spec) / "tokenizer.json")
    if not Path(spec).is_file():
        raise ValueError(f"--tokenizer {spec!r} is neither 'byte' nor an existing tokenizer.json file")
    return HFTokenizer(spec)
