"""Merging attention over disjoint key sets through their log-sum-exps.

For one query row, attention over keys A and B separately gives (o_A, lse_A)
and (o_B, lse_B); attention over A + B is

    lse = logaddexp(lse_A, lse_B),  o = exp(lse_A - lse) o_A + exp(lse_B - lse) o_B

(the online-softmax identity). The block-sparse CPU path merges its bands and
gathered parts with it, ring attention its per-step tiles.
"""

from __future__ import annotations

import torch


def merge_lse(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
              lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """out_*: [..., D], lse_*: [...] (fp32) -> (out, lse) of attention over both key sets.
    Rows with no visible key on either side keep lse = -inf and get out = 0, not NaN.

    Callers pass fp32 lse (and fp32 running outputs where they merge many parts: block_sparse_cpu,
    token_sparse_cpu, ring attention's accumulator): each merge rescales and adds, and a bf16
    running sum would round at every one of them, an error growing with the number of parts;
    lse in bf16 would also put up to ~0.4% error into every weight exp(lse_a - lse)."""
    lse = torch.logaddexp(lse_a, lse_b)
    safe = lse.masked_fill(lse == float("-inf"), 0.0)
    return out_a * torch.exp(lse_a - safe).unsqueeze(-1) + out_b * torch.exp(lse_b - safe).unsqueeze(-1), lse
