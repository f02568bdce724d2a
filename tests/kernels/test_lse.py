"""merge_lse against attention over the union of the key sets, computed directly."""

import torch

from ltrain.kernels.lse import merge_lse


def attend(q, k, v, mask):
    """Masked softmax attention and its lse, q: [N, D], k, v: [M, D], mask: bool [N, M]."""
    s = (q @ k.T / q.shape[-1] ** 0.5).masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse.masked_fill(lse == float("-inf"), 0.0)[:, None])
    return p @ v, lse


def test_merging_two_key_sets_equals_attention_over_both():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(6, 8, generator=g), torch.randn(10, 8, generator=g), torch.randn(10, 8, generator=g)
    mask = torch.rand(6, 10, generator=g) < 0.6
    mask[0] = False  # a row that sees nothing
    mask[1, :5] = False  # a row that sees only the second set
    a, b = mask.clone(), mask.clone()
    a[:, 5:], b[:, :5] = False, False
    out, lse = merge_lse(*attend(q, k, v, a), *attend(q, k, v, b))
    ref_out, ref_lse = attend(q, k, v, mask)
    torch.testing.assert_close(out, ref_out, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse, ref_lse)
    assert lse[0] == float("-inf") and not out[0].any() and not out.isnan().any()
