"""The field's half-precision criterion (docs/algorithms.md#half-precision-test-criterion),
shared by the kernel and collective tests.

An implementation run in bf16 (or fp16) is compared with an fp32 (or fp64)
reference, and so is a plain implementation run in the same dtype (the
yardstick: masked SDPA or the naive formula, computed in that dtype). The
implementation passes when its max abs error is at most 2x the plain one's in
the outputs and 3x in the gradients."""

from __future__ import annotations

import torch

FWD_FACTOR, GRAD_FACTOR = 2.0, 3.0


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b|, both compared in fp64."""
    return (a.double() - b.double()).abs().max().item()


def assert_half_precision(got: dict, plain: dict, want: dict, *, yardstick: str, fwd=("out",)) -> dict:
    """got, plain, want: {name: tensor} -- the implementation in half precision, the plain
    half-precision yardstick (named by `yardstick` in the failure message), the fp32 reference.
    Names in `fwd` are outputs (2x), all others gradients (3x). Returns
    {name: (err_got, err_plain)} so a caller can record the numbers."""
    errs = {k: (max_err(got[k], want[k]), max_err(plain[k], want[k])) for k in want}
    bad = {k: e for k, e in errs.items() if e[0] > (FWD_FACTOR if k in fwd else GRAD_FACTOR) * e[1]}
    assert not bad, (f"half precision: error > {FWD_FACTOR:g}x (outputs) / {GRAD_FACTOR:g}x (gradients) the "
                     f"plain {yardstick}'s: {bad} (name: (this error, plain error); all: {errs})")
    return errs


def check_collective(worker, world_size: int, n: int, cases: list, yardsticks, yardstick) -> dict:
    """Run worker(rank, world_size, n, cases) on `world_size` gloo ranks (rank 0 returns
    {case: {name: tensor}}, the gathered half-precision results); per case, yardsticks(case) ->
    (plain, want) and yardstick(case) -> the plain implementation's name. Asserts the criterion
    for every case; returns {case: {name: (error, plain error)}}."""
    from tests.multiproc import run_ranks

    got = run_ranks(worker, world_size, n, cases, timeout=900)[0]
    errors = {}
    for case in cases:
        plain, want = yardsticks(case)
        errors[case] = assert_half_precision(got[case], plain, want,
                                             yardstick=f"{yardstick(case)} ({', '.join(map(str, case))}, cp={world_size})")
    return errors
