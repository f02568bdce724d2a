import pytest

# Documents of known, distinct lengths (bytes == byte-tokenizer ids; +1 for <eos>).
DOCS = {
    "a.txt": "short\n",
    "sub/b.py": "def f(x):\n    return x + 1  # é ü 😀\n" * 20,
    "sub/deeper/c.txt": "Long document. " * 100,
    "z.txt": "tail\r\nwith CRLF\r\n",
}


@pytest.fixture
def corpus(tmp_path):
    """A source directory holding DOCS; returns (dir, DOCS in the sorted-walk order prepare uses)."""
    src = tmp_path / "src"
    for rel, text in DOCS.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(text.encode())
    order = ["a.txt", "z.txt", "sub/b.py", "sub/deeper/c.txt"]  # a directory's files before its subdirectories
    return src, [DOCS[k] for k in order]
