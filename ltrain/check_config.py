"""Compose and validate a training config once, in one process, before a launcher starts ranks.

    python -m ltrain.check_config --world-size 4 --launch "2 nodes x 2 processes" model=small ...

Under torchrun or srun every rank would otherwise compose the config itself and
print the same error once per rank, followed by torchrun's ChildFailedError
report. launch/torchrun.sh and launch/slurm.sbatch run this first with the
world size they are about to start: exit 0 and silence when the config can
run, else one line `ltrain: config error: ...` and exit 2.
"""

from __future__ import annotations

import argparse
import sys

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ltrain.config import check_known_keys, check_override_keys, register_configs, validate
from ltrain.errors import ConfigError


def _one_line(exc: BaseException) -> str:
    """Hydra's and OmegaConf's multi-line messages as one line; the cause says what was wrong."""
    text = " ".join(str(exc).split("\n\n")[0].split())
    options = getattr(exc, "options", None)
    if options:
        text += " (available: " + ", ".join(options) + ")"
    if exc.__cause__ is not None:
        text += ": " + " ".join(str(exc.__cause__).split("\n")[0].split())
    return text


def check(overrides: list[str], world_size: int) -> None:
    """Raise ConfigError when the composed config cannot run on `world_size` ranks."""
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException

    register_configs()
    check_override_keys(overrides)  # as ltrain-train does: an unknown key is our one line, not Hydra's
    try:
        with initialize_config_module("ltrain.conf", version_base="1.3"):
            dcfg = compose("train", overrides=overrides)
        check_known_keys(dcfg)
        cfg = OmegaConf.to_object(dcfg)
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(f"{_one_line(exc)}, fix the override") from None
    validate(cfg, world_size=world_size)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ltrain.check_config", description=__doc__.split("\n")[0])
    parser.add_argument("--world-size", type=int, required=True, help="ranks the launcher will start")
    parser.add_argument("--launch", default="", help="how those ranks are laid out, for the message")
    args, overrides = parser.parse_known_args(argv)
    try:
        check(overrides, args.world_size)
    except ConfigError as exc:
        where = f" (launch: {args.launch})" if args.launch else ""
        print(f"ltrain: config error: {exc}{where}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
