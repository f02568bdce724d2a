"""`ltrain-ckpt verify PATH`: check checkpoints the way a resume does, without training.

PATH is one checkpoint (a step_* directory), a checkpoints directory (every
step_* in it, newest first), or a run directory (its checkpoints/). Prints one
line per checkpoint, `ok` or what is wrong with which file, and which one
`trainer.resume=auto` would pick. Exit status: 0 all good, 1 some damaged,
2 PATH holds no checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys

from ltrain.checkpoint import MANIFEST, CheckpointError, step_dirs, verify


def checkpoints_under(path: str) -> list[str]:
    """The checkpoint directories PATH names, newest first (one, for a step directory)."""
    if os.path.isdir(os.path.join(path, "checkpoints")) and not step_dirs(path):
        path = os.path.join(path, "checkpoints")
    steps = [p for _, p in reversed(step_dirs(path))]
    return steps or [path]


def verify_all(path: str, out=sys.stdout) -> int:
    """Print one line per checkpoint under PATH; the exit status (module docstring)."""
    if not os.path.isdir(path):
        print(f"ltrain-ckpt: error: {path} is not a directory, pass a checkpoint or checkpoints directory",
              file=sys.stderr)
        return 2
    paths, bad, chosen = checkpoints_under(path), 0, None
    if paths == [path] and not os.path.exists(os.path.join(path, MANIFEST)) \
            and not os.path.basename(os.path.normpath(path)).startswith("step_"):
        print(f"ltrain-ckpt: error: {path} holds no checkpoint (no step_* directories, no {MANIFEST}), "
              "pass a run, checkpoints or step_* directory", file=sys.stderr)
        return 2
    for ckpt in paths:
        try:
            manifest = verify(ckpt)
        except CheckpointError as exc:
            bad += 1
            print(f"damaged  {exc}", file=out)
            continue
        chosen = chosen or ckpt
        size = sum(e if isinstance(e, int) else e["size"] for e in manifest["files"].values())
        hashed = all(isinstance(e, dict) and "sha256" in e for e in manifest["files"].values())
        print(f"ok       {ckpt}: step {manifest['step']}, {len(manifest['files'])} files, {size / 2**20:.1f} MiB, "
              + ("sha256 matches" if hashed else "sizes match (no sha256 recorded)"), file=out)
    if len(paths) > 1:
        print(f"resume=auto would load {chosen}" if chosen else "resume=auto would find no good checkpoint", file=out)
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ltrain-ckpt", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("verify", help="check sizes and sha256 of every file against the manifest")
    check.add_argument("path", metavar="PATH", help="a step_* directory, a checkpoints directory, or a run directory")
    args = parser.parse_args(argv)
    return verify_all(args.path)


if __name__ == "__main__":
    sys.exit(main())
