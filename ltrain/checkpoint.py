"""Atomic, resumable checkpoints around DeepSpeed's own save/load.

Layout under `trainer.ckpt_dir`:

    step_00000100/                DeepSpeed's files (model, optimizer / ZeRO shards,
                                  LR scheduler, client state) ...
        ltrain_rank00000.pt       ... plus what DeepSpeed does not keep: this rank's
                                  RNG streams and data-loader position
        ltrain_complete.json      written last, by rank 0, after every rank finished:
                                  step, tokens, world layout, tracker run id, and the
                                  size of every file (a truncated file is detected)
    latest                        name of the newest complete checkpoint (os.replace)

A directory without `ltrain_complete.json` was interrupted mid-save and is
never loaded. Loading checks the manifest and falls back to the previous
complete checkpoint, saying why, when one is damaged.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
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
        shutil.rmtree(path)  # an earlier attempt at this step died mid-save
    dist.barrier()
    client = {"step": step, "tokens": tokens, "tracker_run_id": tracker_run_id, **extra}
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client, save_latest=False)
    torch.save({"rng": rng_state(), "data": loader.state_dict()}, os.path.join(path, rank_file(rank)))
    dist.barrier()  # every rank's files are on disk
    if rank == 0:
        files = {
            os.path.relpath(os.path.join(root, name), path): os.path.getsize(os.path.join(root, name))
            for root, _, names in os.walk(path) for name in names
        }
        manifest = {"step": step, "tokens": tokens, "tracker_run_id": tracker_run_id,
                    "world_size": dist.get_world_size(), "files": files, **extra}
        _write_atomic(os.path.join(path, MANIFEST), json.dumps(manifest, indent=1))
        _write_atomic(os.path.join(ckpt_dir, LATEST), tag)
        _prune(ckpt_dir, keep_last)
    dist.barrier()
    return path


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _step_dirs(ckpt_dir: str) -> list[tuple[int, str]]:
    out = []
    for name in os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []:
        if name.startswith("step_") and name[5:].isdigit():
            out.append((int(name[5:]), os.path.join(ckpt_dir, name)))
    return sorted(out)


def _prune(ckpt_dir: str, keep_last: int) -> None:
    """Keep the newest `keep_last` complete checkpoints; drop older partial ones."""
    dirs = _step_dirs(ckpt_dir)
    complete = [p for _, p in dirs if os.path.exists(os.path.join(p, MANIFEST))]
    keep = set(complete[-keep_last:])
    newest = complete[-1] if complete else None
    for _, p in dirs:
        if p not in keep and (p in complete or (newest and p < newest)):
            shutil.rmtree(p, ignore_errors=True)


def verify(path: str) -> dict:
    """The manifest of a complete, undamaged checkpoint, or CheckpointError saying what is wrong."""
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.exists(manifest_path):
        raise CheckpointError(f"{path} is incomplete (no {MANIFEST}: the save was interrupted)")
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable {MANIFEST} ({exc})") from None
    for rel, size in manifest["files"].items():
        full = os.path.join(path, rel)
        if not os.path.exists(full):
            raise CheckpointError(f"{path} is damaged: {rel} is missing")
        if os.path.getsize(full) != size:
            raise CheckpointError(f"{path} is damaged: {rel} has {os.path.getsize(full)} bytes, expected {size}")
    return manifest


def candidates(ckpt_dir: str, resume: str) -> list[str]:
    """Checkpoints to try, best first: `auto` = newest complete one first; a path = just that."""
    if resume == "auto":
        return [p for _, p in reversed(_step_dirs(ckpt_dir))]
    if not os.path.isdir(resume):
        raise CheckpointError(f"trainer.resume={resume!r}: no such checkpoint directory")
    return [os.path.abspath(resume)]


def choose(ckpt_dir: str, resume: str) -> Optional[str]:
    """The checkpoint to resume from (rank 0 decides, every rank gets its answer), or None."""
    if resume == "none":
        return None
    chosen = [None]
    if dist.get_rank() == 0:  # one decision for all ranks, even if a file changes while they look
        for path in candidates(ckpt_dir, resume):
            try:
                verify(path)
                chosen[0] = path
                break
            except CheckpointError as exc:
                if resume != "auto":
                    raise
                log.warning("skipping checkpoint: %s", exc)
    dist.broadcast_object_list(chosen, src=0)
    return chosen[0]


def universal_for(path: str, zero_stage: int) -> Optional[str]:
    """A DeepSpeed universal checkpoint of `path` when its ZeRO shards were cut for
    another world size (made once, by rank 0, next to it); None when it loads as is."""
    manifest = verify(path)
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
        _write_atomic(os.path.join(out, MANIFEST), json.dumps({"source": path}))
    dist.barrier()
    return out


def load(engine, loader, path: str, universal: Optional[str] = None) -> Resumed:
    """Restore everything for a bit-exact continuation from `path` (ZeRO state from
    `universal` when resharding to another world size)."""
    manifest = verify(path)
    saved_world = manifest["world_size"]
    load_dir, tag = os.path.split(universal or path)
    loaded, _ = engine.load_checkpoint(load_dir, tag=tag)
    if loaded is None:
        raise CheckpointError(f"DeepSpeed could not load {universal or path}")
    rank = dist.get_rank()
    own = os.path.join(path, rank_file(rank))
    if saved_world == dist.get_world_size():
        state = torch.load(own, weights_only=False)
        set_rng_state(state["rng"])
        loader.load_state_dict(state["data"])
    else:
        # A different world size: the data position is global (see ltrain.data.loader),
        # so rank 0's describes where every rank continues.
        state = torch.load(os.path.join(path, rank_file(0)), weights_only=False)
        loader.load_state_dict(state["data"])
        log.warning("resuming %s saved on %d ranks with %d ranks: per-rank RNG streams restart from "
                    "the seed", path, saved_world, dist.get_world_size())
    log.info("resumed from %s (step %d)", path, manifest["step"])
    return Resumed(step=manifest["step"], tokens=manifest["tokens"],
                   tracker_run_id=manifest.get("tracker_run_id"), path=path)
