import json
import os
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from ltrain.data.config import DataConfig
from ltrain.data.loader import build_loader
from ltrain.data.prepare import main, prepare
from ltrain.data.tokenizer import load_tokenizer
from tests.ltrain.data.test_tokenizer import write_word_tokenizer


def read_docs(out):
    meta = json.loads((out / "meta.json").read_text())
    tokens = np.fromfile(out / "tokens.bin", dtype=meta["dtype"])
    offsets = np.fromfile(out / "docs.idx", dtype=np.int64)
    return meta, [tokens[a:b] for a, b in zip(offsets[:-1], offsets[1:])]


def test_round_trip_text_to_tokens_and_back(corpus, tmp_path, capsys):
    src, texts = corpus
    out = tmp_path / "out"
    assert main([str(src), str(out)]) == 0
    meta, docs = read_docs(out)
    tok = load_tokenizer("byte")
    assert [tok.decode(d[:-1]) for d in docs] == texts
    assert all(d[-1] == 256 for d in docs)
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 258 and meta["eos_id"] == 256
    assert meta["num_docs"] == 4 and meta["num_tokens"] == sum(len(t.encode()) + 1 for t in texts)
    assert "wrote" in capsys.readouterr().out


def test_output_is_identical_for_any_worker_count(corpus, tmp_path):
    src, _ = corpus
    prepare([str(src)], tmp_path / "w1", workers=1)
    prepare([str(src)], tmp_path / "w2", workers=2)
    for name in ("tokens.bin", "docs.idx", "meta.json"):
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes()


def test_ext_filter_exclude_and_explicit_files(corpus, tmp_path):
    src, texts = corpus
    meta = prepare([str(src)], tmp_path / "py", exts=(".py",)).meta
    assert meta["num_docs"] == 1
    meta = prepare([str(src)], tmp_path / "ex", exclude=("deeper", "a.*")).meta
    assert meta["num_docs"] == 2
    _, docs = read_docs(tmp_path / "ex")
    assert bytes(docs[0][:-1].tolist()).decode() == texts[1]
    meta = prepare([str(src / "z.txt"), str(src / "a.txt")], tmp_path / "files").meta
    _, docs = read_docs(tmp_path / "files")
    assert bytes(docs[0][:-1].tolist()).decode() == texts[1]  # command-line order kept


def test_large_vocab_is_stored_as_uint32(corpus, tmp_path):
    src, _ = corpus
    words = [f"w{i}" for i in range(70_000)] + ["Long", "document."]
    tok_path = write_word_tokenizer(tmp_path / "tokenizer.json", words)
    meta = prepare([str(src / "sub" / "deeper")], tmp_path / "out", tokenizer=str(tok_path)).meta
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70_004
    _, docs = read_docs(tmp_path / "out")
    assert docs[0].tolist() == [70_002, 70_003] * 100 + [0]


def test_rerun_is_up_to_date_and_changes_or_force_rebuild(corpus, tmp_path, capsys):
    src, _ = corpus
    out = tmp_path / "out"
    assert main([str(src), str(out)]) == 0
    stamp = (out / "tokens.bin").stat().st_mtime_ns
    capsys.readouterr()
    assert main([str(src), str(out)]) == 0
    assert "is up to date" in capsys.readouterr().out
    assert (out / "tokens.bin").stat().st_mtime_ns == stamp
    assert main([str(src), str(out), "--force"]) == 0
    assert "wrote" in capsys.readouterr().out
    (src / "a.txt").write_text("changed, and longer\n")
    assert main([str(src), str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert read_docs(out)[0]["num_tokens"] > 0


def test_interrupted_output_is_redone(corpus, tmp_path, capsys):
    src, _ = corpus
    out = tmp_path / "out"
    prepare([str(src)], out)
    reference = (out / "tokens.bin").read_bytes()
    # What a kill between writing and renaming leaves: tmp files, a stale tokens.bin, no meta.json.
    (out / "meta.json").unlink()
    (out / "tokens.bin").write_bytes(b"stale")
    (out / "tokens.bin.tmp").write_bytes(b"partial")
    assert main([str(src), str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert (out / "tokens.bin").read_bytes() == reference
    assert not list(out.glob("*.tmp"))


def test_undecodable_binary_and_empty_files_are_skipped_and_counted(corpus, tmp_path, capsys):
    src, _ = corpus
    (src / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (src / "blob.txt").write_bytes(b"abc\0def")
    (src / "empty.txt").write_bytes(b"")
    assert main([str(src), str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "skipped 3: 1 binary, 1 empty, 1 not UTF-8" in err and "blob.txt" in err
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert (meta["num_docs"], meta["num_skipped"]) == (4, 3)


@pytest.mark.parametrize(
    "setup, needle",
    [
        (lambda src, tmp: ([str(tmp / "nope")], tmp / "out"), "nope does not exist"),
        (lambda src, tmp: ([str(src)], src / "a.txt"), "a.txt exists and is not a directory"),
        (lambda src, tmp: ([str(src), "--ext", ".rs"], tmp / "out"), "has no files ending in .rs"),
        (lambda src, tmp: ([str(src), "--tokenizer", str(tmp / "t.json")], tmp / "out"), "--tokenizer"),
        (lambda src, tmp: ([str(src), "--workers", "0"], tmp / "out"), "--workers 0"),
    ],
)
def test_bad_inputs_fail_with_one_line_and_exit_2(corpus, tmp_path, capsys, setup, needle):
    src, _ = corpus
    args, out = setup(src, tmp_path)
    assert main([*args[:1], str(out), *args[1:]]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.startswith("ltrain-prepare: error:") and err.count("\n") == 1


def test_empty_directory_and_unreadable_file_are_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), str(tmp_path / "out")]) == 2
    assert "empty has no files" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    os.symlink(tmp_path / "gone.txt", tmp_path / "bad" / "link.txt")  # listed by the walk, unreadable
    assert main([str(tmp_path / "bad"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "cannot read" in err and "bad/link.txt" in err


def test_only_binary_files_is_an_error(tmp_path, capsys):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "x.dat").write_bytes(b"\0\1\2")
    assert main([str(tmp_path / "bin"), str(tmp_path / "out")]) == 2
    assert "no text documents among 1 source files (skipped 1: 1 binary" in capsys.readouterr().err


def test_stdlib_subset_trains_through_the_memmap_loader(tmp_path):
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    meta = prepare([str(stdlib / "json"), str(stdlib / "textwrap.py")], tmp_path / "std", exts=(".py",), workers=2).meta
    assert meta["num_docs"] >= 5 and meta["num_tokens"] > 20_000
    _, docs = read_docs(tmp_path / "std")
    assert bytes(docs[-1][:-1].tolist()) == (stdlib / "textwrap.py").read_bytes()
    loader = build_loader(DataConfig(kind="memmap", path=str(tmp_path / "std"), seq_len=512, micro_batch_size=2),
                          seed=0, dp_rank=0, dp_size=1)
    assert loader.vocab_size == 258
    assert loader.next_batch()["input_ids"].shape == (2, 512)


def hf_checkpoint_dir(path):
    """A Hugging Face checkpoint directory as save_pretrained leaves it, without weights: a tiny
    LlamaConfig and a byte-level BPE tokenizer trained here on a few strings (no network)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 5 + ["hello world, hello tokenizer"],
                            trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.save_pretrained(str(path))
    LlamaConfig(vocab_size=len(fast), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1).save_pretrained(str(path))
    assert (path / "tokenizer.json").is_file() and (path / "config.json").is_file()
    return path, tok


def test_prepare_with_the_tokenizer_json_of_a_hf_checkpoint_dir(tmp_path):
    import subprocess
    import sys

    from transformers import AutoConfig

    ckpt, hf = hf_checkpoint_dir(tmp_path / "hf_ckpt")
    src = tmp_path / "src"
    src.mkdir()
    texts = ["the quick brown fox\njumps over the lazy dog\n", "hello world, hello tokenizer é 😀\n", "zebra xylophone"]
    for i, t in enumerate(texts):
        (src / f"d{i}.txt").write_text(t)
    outs = {}
    for name, spec in (("file", ckpt / "tokenizer.json"), ("dir", ckpt)):
        out = tmp_path / f"out_{name}"
        proc = subprocess.run([sys.executable, "-m", "ltrain.data.prepare", str(src), str(out), "--tokenizer", str(spec)],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        outs[name] = out
    meta, docs = read_docs(outs["file"])
    vocab = hf.get_vocab_size(with_added_tokens=True)
    assert meta["vocab_size"] == vocab == AutoConfig.from_pretrained(str(ckpt)).vocab_size
    assert meta["eos_id"] == hf.token_to_id("<|endoftext|>") and meta["tokenizer"] == str((ckpt / "tokenizer.json").resolve())
    assert meta["num_docs"] == 3 and all(d[-1] == meta["eos_id"] for d in docs)
    assert max(int(d.max()) for d in docs) < vocab
    assert [hf.decode(d[:-1].tolist()) for d in docs] == texts  # byte-level BPE: an exact round trip
    assert [d[:-1].tolist() for d in docs] == [hf.encode(t, add_special_tokens=False).ids for t in texts]
    # The checkpoint directory itself names the same tokenizer: the same corpus, byte for byte.
    for name in ("tokens.bin", "docs.idx", "meta.json"):
        assert (outs["dir"] / name).read_bytes() == (outs["file"] / name).read_bytes()


def test_a_directory_without_tokenizer_json_is_refused(tmp_path, corpus):
    src, _ = corpus
    (tmp_path / "empty_ckpt").mkdir()
    from ltrain.data.prepare import PrepareError

    with pytest.raises(PrepareError, match="is a directory without a tokenizer.json"):
        prepare([str(src)], tmp_path / "out", tokenizer=str(tmp_path / "empty_ckpt"))
