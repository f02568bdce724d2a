"""Atomic, resumable checkpoints around DeepSpeed's own save/load.

Layout under `trainer.ckpt_dir`:

    step_00000100/                DeepSpeed's files (model, optimizer / ZeRO shards,
                                  LR scheduler, client state) ...
        ltrain_rank00000.pt       ... plus what DeepSpeed does not keep: this rank's
                                  RNG streams and data-loader position
        ltrain_complete.json      written last, by rank 0, after every rank finished:
                                  step, tokens, world layout, tracker run id, and the
                                  size and sha256 of every file
    latest                        name of the newest complete checkpoint (os.replace)

A directory without `ltrain_complete.json` was interrupted mid-save and is
never loaded. Resuming checks every file against the manifest (size, then
sha256: a flipped byte or a broken zip is caught before DeepSpeed sees it)
and falls back to the previous good checkpoint with one warning line naming
the file. `ltrain-ckpt verify PATH` runs the same check by hand.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger("ltrain.checkpoint")

MANIFEST = "ltrain_complete.json"
LATEST = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says which and why."""


@dataclass
class Resumed:
    step: int
    tokens: int
    tracker_run_id: Optional[str]
    path: str


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rank_file(rank: int) -> str:
    return f"ltrain_rank{rank:05d}.pt"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_writable(ckpt_dir: str) -> None:
    """Fail before training, not at the first save hours later."""
    try:
        os.makedirs(ckpt_dir, exist_ok=True)
        probe = os.path.join(ckpt_dir, f".write_probe_{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as exc:
        raise CheckpointError(
            f"trainer.ckpt_dir={ckpt_dir!r} is not writable ({exc.strerror}); "
            "point it at a writable directory"
        ) from None


def save(engine, ckpt_dir: str, *, step: int, tokens: int, loader, tracker_run_id: Optional[str],
         keep_last: int, extra: dict) -> str:
    """Save on every rank (collective); visible only once every rank has finished."""
    rank = dist.get_rank()
    tag = tag_for(step)
    path = os.path.join(ckpt_dir, tag)
    if rank == 0 and os.path.isdir(path):
        shutil.rmtree(path)  # an earlier attempt at this step died mid-save (the run lock excludes a live writer)
    dist.barrier()
    client = {"step": step, "tokens": tokens, "tracker_run_id": tracker_run_id, **extra}
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client, save_latest=False)
    torch.save({"rng": rng_state(), "data": loader.state_dict()}, os.path.join(path, rank_file(rank)))
    dist.barrier()  # every rank's files are on disk
    files = hash_files(path)
    if rank == 0:
        manifest = {"step": step, "tokens": tokens, "tracker_run_id": tracker_run_id,
                    "world_size": dist.get_world_size(), "files": files, **extra}
        write_atomic(os.path.join(path, MANIFEST), json.dumps(manifest, indent=1))
        write_atomic(os.path.join(ckpt_dir, LATEST), tag)
        _prune(ckpt_dir, keep_last, protect=path)
    dist.barrier()
    return path


def sha256_file(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _list_files(path: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(root, name), path)
                  for root, _, names in os.walk(path) for name in names if name != MANIFEST)


def _file_pool(n_files: int) -> ThreadPoolExecutor:
    """Threads for hashing a rank's share of a checkpoint's files: hashlib releases the GIL
    on large buffers, so they hash in parallel (sha256 ~1.1 GiB/s per core)."""
    return ThreadPoolExecutor(max(1, min(n_files, os.cpu_count() or 1, 8)))


def hash_files(path: str) -> Optional[dict]:
    """{file: {"size", "sha256"}} of a just-saved checkpoint, on rank 0 (None elsewhere).

    Read right after the write, so from the page cache; each rank hashes every
    world-th file so the cost spreads over ranks (ZeRO writes one shard per rank).
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    names = [_list_files(path) if rank == 0 else None]
    dist.broadcast_object_list(names, src=0)  # one listing, even if ranks' views of the directory lag
    share = names[0][rank::world]
    with _file_pool(len(share)) as pool:
        digests = pool.map(lambda rel: sha256_file(os.path.join(path, rel)), share)
        mine = {rel: {"size": os.path.getsize(os.path.join(path, rel)), "sha256": d} for rel, d in zip(share, digests)}
    parts = [None] * world if rank == 0 else None
    dist.gather_object(mine, parts, dst=0)
    return {rel: entry for part in parts for rel, entry in part.items()} if rank == 0 else None


def write_atomic(path: str, text: str) -> None:
    """Write `text` to `path` so a reader sees the old content or all of the new, never a part."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def step_dirs(ckpt_dir: str) -> list[tuple[int, str]]:
    out = []
    for name in os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []:
        if name.startswith("step_") and name[5:].isdigit():
            out.append((int(name[5:]), os.path.join(ckpt_dir, name)))
    return sorted(out)


def _prune(ckpt_dir: str, keep_last: int, protect: Optional[str] = None) -> None:
    """Keep the newest `keep_last` complete checkpoints and `protect` (the one just saved
    and hashed: a damaged checkpoint with a higher step must not crowd out the newest
    good one); drop older partial ones."""
    dirs = step_dirs(ckpt_dir)
    complete = [p for _, p in dirs if os.path.exists(os.path.join(p, MANIFEST))]
    keep = set(complete[-keep_last:]) | {protect}
    newest = complete[-1] if complete else None
    for _, p in dirs:
        if p not in keep and (p in complete or (newest and p < newest)):
            shutil.rmtree(p, ignore_errors=True)


def read_manifest(path: str) -> dict:
    """The manifest of a checkpoint directory, or CheckpointError saying why there is none."""
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is not a checkpoint directory (it does not exist)")
    if not os.path.exists(manifest_path):
        if step_dirs(path) or os.path.exists(os.path.join(path, LATEST)):
            raise CheckpointError(f"{path} holds checkpoints (step_* directories) but is not one itself")
        raise CheckpointError(f"{path} is incomplete (no {MANIFEST}: the save was interrupted)")
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
        manifest["files"].items()
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{path} is damaged: {MANIFEST} is unreadable ({_first_line(exc)})") from None
    return manifest


def _check_file(path: str, rel: str, entry) -> Optional[str]:
    """What is wrong with one file of a checkpoint, or None."""
    full = os.path.join(path, rel)
    size, digest = (entry, None) if isinstance(entry, int) else (entry.get("size"), entry.get("sha256"))
    try:
        got = os.path.getsize(full)
        if got != size:
            return f"{rel} has {got} bytes, expected {size} (truncated or overwritten)"
        if digest is not None:
            if sha256_file(full) != digest:
                return f"{rel} has the right size but not its recorded sha256 (bytes changed on disk)"
        elif full.endswith(".pt"):  # a manifest from before sha256 was recorded: at least the zip must be whole
            with zipfile.ZipFile(full) as z:
                if z.testzip() is not None:
                    return f"{rel} is a broken zip archive"
    except FileNotFoundError:
        return f"{rel} is missing"
    except zipfile.BadZipFile as exc:
        return f"{rel} is a broken zip archive ({exc})"
    except OSError as exc:
        return f"{rel} cannot be read ({exc.strerror or exc})"
    return None


def verify(path: str, part: tuple[int, int] = (0, 1)) -> dict:
    """The manifest of a complete, undamaged checkpoint, or CheckpointError naming the
    first bad file. `part=(i, n)` checks only every n-th file from the i-th (ranks share the reads)."""
    manifest = read_manifest(path)
    share = sorted(manifest["files"])[part[0]::part[1]]
    with _file_pool(len(share)) as pool:
        problems = pool.map(lambda rel: _check_file(path, rel, manifest["files"][rel]), share)
        problem = next((p for p in problems if p), None)
    if problem:
        raise CheckpointError(f"{path} is damaged: {problem}")
    return manifest


def candidates(ckpt_dir: str, resume: str) -> list[str]:
    """Checkpoints to try, best first: `auto` = newest first; a checkpoints directory
    (holding step_*) = its newest first too; a step directory = just that."""
    if resume == "auto":
        return [p for _, p in reversed(step_dirs(ckpt_dir))]
    if not os.path.isdir(resume):
        raise CheckpointError(f"trainer.resume={resume!r}: no such checkpoint directory")
    if not os.path.exists(os.path.join(resume, MANIFEST)) and step_dirs(resume):
        return [os.path.abspath(p) for _, p in reversed(step_dirs(resume))]
    return [os.path.abspath(resume)]


def choose(ckpt_dir: str, resume: str) -> Optional[str]:
    """The checkpoint to resume from, or None. Collective: rank 0 lists the candidates,
    every rank checks its share of each one's files, and all ranks get the same answer
    or the same CheckpointError (no rank is left waiting)."""
    if resume == "none":
        return None
    rank, world = dist.get_rank(), dist.get_world_size()
    listing: list = [None]
    if rank == 0:  # one decision for all ranks, even if a file changes while they look
        try:
            listing[0] = candidates(ckpt_dir, resume)
        except CheckpointError as exc:
            listing[0] = str(exc)
    dist.broadcast_object_list(listing, src=0)
    if isinstance(listing[0], str):
        raise CheckpointError(listing[0])
    explicit = resume != "auto" and len(listing[0]) == 1
    for path in listing[0]:
        try:
            verify(path, part=(rank, world))
            problem = None
        except CheckpointError as exc:
            problem = str(exc)
        problems = [None] * world
        dist.all_gather_object(problems, problem)
        problem = next((p for p in problems if p), None)
        if problem is None:
            return path
        if explicit:
            raise CheckpointError(problem)
        if rank == 0:
            log.warning("skipping checkpoint: %s", problem)
    return None


def universal_for(path: str, zero_stage: int) -> Optional[str]:
    """A DeepSpeed universal checkpoint of `path` when its ZeRO shards were cut for
    another world size (made once, by rank 0, next to it); None when it loads as is."""
    manifest = read_manifest(path)  # choose() checked its files
    if manifest["world_size"] == dist.get_world_size() or max(zero_stage, manifest.get("zero_stage", 0)) == 0:
        return None
    if manifest.get("zero_stage", 0) == 3 or zero_stage == 3:
        # Converted ZeRO-3 shards did not reproduce the next optimizer step exactly
        # (tests/ltrain/test_checkpoint.py), so ltrain refuses rather than drift.
        raise CheckpointError(
            f"{path} was saved on {manifest['world_size']} ranks; ZeRO-3 state cannot be resharded exactly "
            f"to {dist.get_world_size()} ranks: resume on {manifest['world_size']} ranks, or train with "
            "parallel.zero_stage <= 2 to change the data-parallel degree"
        )
    out = os.path.join(os.path.dirname(path), "universal", os.path.basename(path))
    if dist.get_rank() == 0 and not os.path.exists(os.path.join(out, MANIFEST)):
        from argparse import Namespace

        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

        log.warning("%s was saved on %d ranks; converting its ZeRO shards to a universal checkpoint for %d",
                    path, manifest["world_size"], dist.get_world_size())
        shutil.rmtree(out, ignore_errors=True)
        ds_to_universal(Namespace(input_folder=path, output_folder=out, num_extract_workers=1,
                                  num_merge_workers=1, keep_temp_folder=False, strict=True,
                                  inject_missing_state=True))
        write_atomic(os.path.join(out, MANIFEST), json.dumps({"source": path}))
    dist.barrier()
    return out


def load(engine, loader, path: str, universal: Optional[str] = None) -> Resumed:
    """Restore everything for a bit-exact continuation from `path` (ZeRO state from
    `universal` when resharding to another world size). `path` comes from choose(),
    which checked its files; what still fails to load is one CheckpointError line."""
    manifest = read_manifest(path)
    saved_world = manifest["world_size"]
    load_dir, tag = os.path.split(universal or path)
    try:
        loaded, _ = engine.load_checkpoint(load_dir, tag=tag)
    except (RuntimeError, OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{universal or path} does not load ({_first_line(exc)}); resume with the config it "
                              "was saved with, pick another with trainer.resume=PATH, or trainer.resume=none") from None
    if loaded is None:
        raise CheckpointError(f"DeepSpeed could not load {universal or path}")
    rank = dist.get_rank()
    own = os.path.join(path, rank_file(rank))
    if saved_world == dist.get_world_size():
        state = _load_rank_file(own)
        set_rng_state(state["rng"])
        loader.load_state_dict(state["data"])
    else:
        # A different world size: the data position is global (see ltrain.data.loader),
        # so rank 0's describes where every rank continues.
        state = _load_rank_file(os.path.join(path, rank_file(0)))
        loader.load_state_dict(state["data"])
        log.warning("resuming %s saved on %d ranks with %d ranks: per-rank RNG streams restart from "
                    "the seed", path, saved_world, dist.get_world_size())
    log.info("resumed from %s (step %d)", path, manifest["step"])
    return Resumed(step=manifest["step"], tokens=manifest["tokens"],
                   tracker_run_id=manifest.get("tracker_run_id"), path=path)


def _load_rank_file(path: str) -> dict:
    try:
        return torch.load(path, weights_only=False)
    except (RuntimeError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{path} does not load ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
