"""The oracle (kernels/block_sparse_ref.py) against a naive loop over query
tokens and their visible keys (with and without packed documents), in float64:
forward and gradients."""

import math

import pytest
import torch

from ltrain.kernels import BlockLayout
from ltrain.kernels.block_sparse_ref import block_sparse_reference


def naive(q, k, v, layout, bs, causal, q_start, k_start, q_doc=None, k_doc=None):
    """One softmax per (batch, head, token) over the keys its row of the layout lists (and, with
    doc ids, of its document)."""
    B, Hq, Nq, D = q.shape
    G = Hq // k.shape[1]
    rows_are_tokens = layout.num_q_blocks == Nq
    outs, lses = torch.zeros_like(q), torch.full((B, Hq, Nq), float("-inf"), dtype=q.dtype)
    for b in range(B):
        for h in range(Hq):
            bl, hl = min(b, layout.counts.shape[0] - 1), h * layout.counts.shape[1] // Hq
            for i in range(Nq):
                row = i if rows_are_tokens else i // bs
                blocks = layout.indices[bl, hl, row, : layout.counts[bl, hl, row]].tolist()
                keys = [j for J in blocks for j in range(J * bs, (J + 1) * bs)
                        if (not causal or k_start + j <= q_start + i) and (q_doc is None or q_doc[b, i] == k_doc[b, j])]
                if keys:
                    s = torch.stack([q[b, h, i] @ k[b, h // G, j] / math.sqrt(D) for j in keys])
                    p = torch.softmax(s, 0)
                    outs[b, h, i] = sum(p[n] * v[b, h // G, j] for n, j in enumerate(keys))
                    lses[b, h, i] = torch.logsumexp(s, 0)
    return outs, lses


@pytest.mark.parametrize("docs", [False, True])
@pytest.mark.parametrize("token_rows", [False, True])
@pytest.mark.parametrize("causal, q_start", [(True, 0), (True, 8), (False, 0)])
def test_oracle_equals_the_naive_loop(token_rows, causal, q_start, docs):
    bs, B, Hq, Hkv, Nq, Nk, D = 4, 2, 4, 2, 8, 16, 8
    g = torch.Generator().manual_seed(1)
    rows = Nq if token_rows else Nq // bs
    mask = torch.rand(1, Hkv, rows, Nk // bs, generator=g) < 0.5
    mask[0, 0, 0] = False  # an empty row
    layout = BlockLayout.from_block_mask(mask)
    q = torch.randn(B, Hq, Nq, D, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(B, Hkv, Nk, D, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    do = torch.randn(B, Hq, Nq, D, generator=g, dtype=torch.float64)
    # Packed documents of the queries' row (positions q_start..) and the keys' (0..): boundaries inside
    # blocks of 4, a 1-token document.
    row = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 2, 3, 3, 3, 3, 3, 3, 4, 4, 4, 4, 4, 4, 4, 4, 4])[None].repeat(B, 1)
    ids = dict(q_doc=row[:, q_start:q_start + Nq], k_doc=row[:, :Nk]) if docs else {}
    got, got_lse = block_sparse_reference(q, k, v, layout, causal=causal, q_start=q_start, **ids)
    want, want_lse = naive(q, k, v, layout, bs, causal, q_start, 0, **ids)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_lse, want_lse.float())
    grads = torch.autograd.grad(got, (q, k, v), do)
    for g_got, g_want in zip(grads, torch.autograd.grad(want, (q, k, v), do)):
        torch.testing.assert_close(g_got, g_want)
