import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from ltrain.data.tokenizer import BYTE_EOS, BYTE_PAD, BYTE_VOCAB_SIZE, ByteTokenizer, load_tokenizer


def test_byte_tokenizer_ids_and_round_trip():
    tok = load_tokenizer("byte")
    assert (tok.vocab_size, tok.eos_id, tok.pad_id) == (BYTE_VOCAB_SIZE, BYTE_EOS, BYTE_PAD) == (258, 256, 257)
    text = "héllo\r\n😀"
    ids = tok.encode(text.encode())
    assert ids.tolist() == list(text.encode())
    assert tok.decode([*ids.tolist(), BYTE_EOS]) == text


def test_byte_tokenizer_rejects_non_utf8():
    with pytest.raises(UnicodeDecodeError):
        ByteTokenizer().encode(b"\xff\xfe")


def write_word_tokenizer(path, words, eos="<|endoftext|>"):
    vocab = {w: i for i, w in enumerate([eos, "[UNK]", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path))
    return path


def test_hf_tokenizer_from_local_file(tmp_path):
    tok = load_tokenizer(str(write_word_tokenizer(tmp_path / "tokenizer.json", ["hello", "world"])))
    assert (tok.vocab_size, tok.eos_id) == (4, 0)
    assert tok.encode(b"hello world nope").tolist() == [2, 3, 1]
    assert tok.decode([2, 3]) == "hello world"
    assert tok.identity().startswith("hf-sha256:")


def test_hf_tokenizer_without_eos_is_refused(tmp_path):
    path = write_word_tokenizer(tmp_path / "tokenizer.json", ["hello"], eos="<nothing>")
    with pytest.raises(ValueError, match="end-of-document"):
        load_tokenizer(str(path))


def test_unknown_tokenizer_spec(tmp_path):
    with pytest.raises(ValueError, match="--tokenizer"):
        load_tokenizer(str(tmp_path / "missing.json"))
