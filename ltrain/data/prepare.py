"""ltrain-prepare: tokenize text files into the memmap layout read by ltrain.data.memmap.

    python -m ltrain.data.prepare SRC_DIR_OR_FILE... OUT_DIR [--tokenizer byte|tokenizer.json|HF_DIR]
        [--workers N] [--ext .py,.txt] [--exclude GLOB] [--force]

Every file is one document followed by <eos>. Directories are walked
recursively in sorted order (files named on the command line are kept in
the order given), and workers return results in that order, so the output
is byte-identical for any --workers.

Files that are not UTF-8 text (undecodable, or containing NUL bytes) and
empty files are skipped and counted; a file that cannot be read at all is an
error naming it, because the user asked for it and it would silently go
missing. Output is written into a temporary directory next to OUT_DIR and
moved into place only when complete (a new OUT_DIR is one rename; in an
existing one meta.json goes last, so a directory with a meta.json is
complete): a failed run leaves an existing corpus as it was and no
temporary files. Re-running with the same sources
(paths, sizes, mtimes) and tokenizer reports it is up to date and exits 0;
--force rebuilds.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ltrain.data.config import DataConfigError
from ltrain.data.memmap import DOCS, META, META_VERSION, TOKENS, read_meta
from ltrain.data.tokenizer import load_tokenizer


class PrepareError(Exception):
    """A problem with the inputs or output of ltrain-prepare; one line, printed without traceback."""


@dataclass
class PrepareResult:
    meta: dict
    up_to_date: bool = False
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


def collect_files(
    sources: list[str], out_dir: Path, exts: tuple[str, ...] = (), exclude: tuple[str, ...] = ()
) -> list[Path]:
    """Files named directly, plus files under directories: sorted walk, keeping names that end
    in one of `exts` (all if empty) and dropping files and directories whose name matches an
    `exclude` glob."""
    out = out_dir.resolve()
    files: list[Path] = []
    for src in sources:
        p = Path(src)
        if p.is_file():
            files.append(p)
            continue
        if not p.is_dir():
            raise PrepareError(f"source {src} does not exist")
        found = 0
        for root, dirs, names in os.walk(p):
            dirs[:] = sorted(d for d in dirs if not _excluded(d, exclude) and Path(root, d).resolve() != out)
            for name in sorted(names):
                if (not exts or name.endswith(exts)) and not _excluded(name, exclude):
                    files.append(Path(root, name))
                    found += 1
        if not found:
            raise PrepareError(f"source directory {src} has no files" + (f" ending in {', '.join(exts)}" if exts else ""))
    return files


def _excluded(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def source_hash(files: list[Path], tokenizer_identity: str) -> str:
    """sha256 over the format version, tokenizer and every file's path, size and mtime."""
    h = hashlib.sha256(f"ltrain-prepare-v{META_VERSION}\0{tokenizer_identity}\0".encode())
    for f in files:
        try:
            st = f.stat()
        except OSError as e:
            raise PrepareError(f"cannot read {f}: {e.strerror}") from None
        h.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()


_worker_tokenizer = None


def _init_worker(spec: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(spec)


def _encode_file(args: tuple[Path, str]) -> tuple[str, object]:
    """("ok", ids with <eos>) | ("skip", reason) | ("error", message); never raises."""
    path, dtype = args
    try:
        data = path.read_bytes()
    except OSError as e:
        return "error", f"cannot read {path}: {e.strerror}"
    if not data:
        return "skip", "empty"
    if b"\0" in data:
        return "skip", "binary"
    try:
        ids = _worker_tokenizer.encode(data)
    except UnicodeDecodeError:
        return "skip", "not UTF-8"
    return "ok", np.append(ids, _worker_tokenizer.eos_id).astype(dtype)


def prepare(
    sources: list[str],
    out_dir: str | Path,
    *,
    tokenizer: str = "byte",
    workers: int = 1,
    exts: tuple[str, ...] = (),
    exclude: tuple[str, ...] = (),
    force: bool = False,
) -> PrepareResult:
    """Write OUT_DIR/{tokens.bin, docs.idx, meta.json}; see the module docstring."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise PrepareError(f"output {out} exists and is not a directory")
    if workers < 1:
        raise PrepareError(f"--workers {workers} must be >= 1")
    try:
        tok = load_tokenizer(tokenizer)
    except ValueError as e:
        raise PrepareError(str(e)) from None
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises plain Exception for a bad file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PrepareError(f"--tokenizer {tokenizer} is not a valid tokenizer.json ({first}), "
                           "pass a file saved by the tokenizers library or 'byte'") from None
    files = collect_files(sources, out, exts, exclude)
    if not files:
        raise PrepareError("no source files given")
    digest = source_hash(files, tok.identity())
    if not force:
        try:
            meta = read_meta(str(out))
        except DataConfigError:
            meta = None
        if meta is not None and meta["source_hash"] == digest:
            return PrepareResult(meta, up_to_date=True)

    tmp = _make_tmp_dir(out)
    try:
        meta, skipped = _write_corpus(tmp, files, tok, tokenizer, workers, digest)
        _move_into_place(tmp, out)
    except OSError as e:
        raise PrepareError(f"cannot write {out}: {e.strerror or e} ({e.filename or out}), "
                           "choose a writable output directory") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful move
    return PrepareResult(meta, skipped=skipped)


def _make_tmp_dir(out: Path) -> Path:
    """An empty directory next to OUT_DIR (same filesystem, so the final renames are atomic)."""
    tmp = out.parent / f".{out.name}.ltrain-prepare-{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a killed earlier run with the same pid
        tmp.mkdir()
    except OSError as e:
        raise PrepareError(f"cannot write {out}: {e.strerror or e} ({e.filename or out.parent}), "
                           "choose a writable output directory") from None
    return tmp


def _write_corpus(tmp: Path, files: list[Path], tok, tokenizer: str, workers: int, digest: str) -> tuple[dict, list]:
    """tokens.bin, docs.idx, meta.json of `files` in `tmp`."""
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    offsets, skipped, max_id = [0], [], -1
    jobs = [(f, dtype) for f in files]
    # spawn, not fork: a parent that loaded a Rust tokenizer must not be forked.
    pool = multiprocessing.get_context("spawn").Pool(workers, _init_worker, (tokenizer,)) if workers > 1 else None
    if pool is None:
        _init_worker(tokenizer)
    try:
        results = pool.imap(_encode_file, jobs, chunksize=8) if pool else map(_encode_file, jobs)
        with open(tmp / TOKENS, "wb") as fh:
            for f, (status, value) in zip(files, tqdm(results, total=len(files), unit="file", disable=None)):
                if status == "error":
                    raise PrepareError(value)
                if status == "skip":
                    skipped.append((str(f), value))
                    continue
                value.tofile(fh)
                offsets.append(offsets[-1] + len(value))
                max_id = max(max_id, int(value.max()))
    finally:
        if pool is not None:
            pool.terminate()
    if len(offsets) == 1:
        raise PrepareError(f"no text documents among {len(files)} source files ({_skip_summary(skipped)})")
    np.asarray(offsets, dtype=np.int64).tofile(tmp / DOCS)
    meta = {
        "version": META_VERSION,
        "tokenizer": tok.name,
        "tokenizer_identity": tok.identity(),
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "max_id": max_id,  # what the model's embedding must cover (checked by ltrain.config)
        "dtype": np.dtype(dtype).name,
        "num_tokens": offsets[-1],
        "num_docs": len(offsets) - 1,
        "num_files": len(files),
        "num_skipped": len(skipped),
        "source_hash": digest,
    }
    (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
    return meta, skipped


def _move_into_place(tmp: Path, out: Path) -> None:
    """A new OUT_DIR: one rename. An existing one (it may hold other files): replace the
    data files one by one, meta.json removed first and written last, so a reader never
    sees a meta.json that does not describe the files next to it."""
    if not out.exists():
        os.rename(tmp, out)
        return
    (out / META).unlink(missing_ok=True)
    for name in (TOKENS, DOCS, META):
        os.replace(tmp / name, out / name)
    for name in (TOKENS, DOCS, META):  # left by a version that wrote *.tmp files inside OUT_DIR
        (out / (name + ".tmp")).unlink(missing_ok=True)


def _skip_summary(skipped: list[tuple[str, str]]) -> str:
    """'skipped 3: 2 empty, 1 binary (e.g. a/b.py)' -- one line however many."""
    counts: dict[str, int] = {}
    for _, reason in skipped:
        counts[reason] = counts.get(reason, 0) + 1
    non_empty = [p for p, r in skipped if r != "empty"]
    example = f" (e.g. {non_empty[0]})" if non_empty else ""
    return f"skipped {len(skipped)}: " + ", ".join(f"{n} {r}" for r, n in counts.items()) + example


def _parse_exts(values: list[str] | None) -> tuple[str, ...]:
    exts = [e.strip() for v in values or [] for e in v.split(",") if e.strip()]
    return tuple(e if e.startswith(".") else "." + e for e in exts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ltrain-prepare", description=__doc__.split("\n")[0])
    parser.add_argument("sources", nargs="+", metavar="SRC", help="source file or directory (walked recursively)")
    parser.add_argument("out", metavar="OUT_DIR", help="output directory")
    parser.add_argument("--tokenizer", default="byte", help="'byte' (default, vocab 258), a local tokenizer.json, or a Hugging Face "
                        "checkpoint directory holding one")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes (output is identical for any value)")
    parser.add_argument("--ext", action="append", help="only files ending in these extensions when walking directories, e.g. .py,.txt")
    parser.add_argument("--exclude", action="append", default=[], help="skip files and directories with this name (glob; repeatable), e.g. site-packages")
    parser.add_argument("--force", action="store_true", help="rebuild even if OUT_DIR is up to date")
    args = parser.parse_args(argv)
    sources, out = args.sources, args.out
    start = time.perf_counter()
    try:
        result = prepare(sources, out, tokenizer=args.tokenizer, workers=args.workers, exts=_parse_exts(args.ext),
                         exclude=tuple(args.exclude), force=args.force)
    except PrepareError as e:
        print(f"ltrain-prepare: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ltrain-prepare: error: interrupted, {out} is as it was before; run the command again", file=sys.stderr)
        return 2
    m = result.meta
    if result.up_to_date:
        print(f"{out} is up to date ({m['num_docs']} documents, {m['num_tokens']} tokens); --force rebuilds it")
        return 0
    if result.skipped:
        print(f"ltrain-prepare: warning: of {m['num_files']} files, {_skip_summary(result.skipped)}", file=sys.stderr)
    print(
        f"wrote {out}: {m['num_docs']} documents, {m['num_tokens']} tokens ({m['dtype']}, vocab {m['vocab_size']}, "
        f"eos {m['eos_id']}) in {time.perf_counter() - start:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
