import math

import torch

from ltrain.nn.rope import apply_rotary, rope_tables


def naive_rotate(x, pos, base):
    """Rotate pairs (i, i + D/2) by pos * base^(-2i/D), one position at a time."""
    d = x.shape[-1]
    out = x.clone()
    for t, p in enumerate(pos.tolist()):
        for i in range(d // 2):
            ang = p * base ** (-2 * i / d)
            a, b = x[..., t, i], x[..., t, i + d // 2]
            out[..., t, i] = a * math.cos(ang) - b * math.sin(ang)
            out[..., t, i + d // 2] = b * math.cos(ang) + a * math.sin(ang)
    return out


def test_rotary_matches_naive_definition():
    x = torch.randn(1, 2, 5, 8, dtype=torch.float64)
    pos = torch.tensor([[0, 3, 7, 100, 4096]])
    cos, sin = rope_tables(pos, 8, base=10000.0, dtype=torch.float64)
    torch.testing.assert_close(apply_rotary(x, cos, sin), naive_rotate(x, pos[0], 10000.0))


def test_relative_property_dot_product_depends_on_offset_only():
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(pq, pk):
        cq, sq = rope_tables(torch.tensor([[pq]]), 16)
        ck, sk = rope_tables(torch.tensor([[pk]]), 16)
        return (apply_rotary(q, cq, sq) * apply_rotary(k, ck, sk)).sum()

    torch.testing.assert_close(score(10, 3), score(1010, 1003), rtol=1e-4, atol=1e-4)


def test_linear_scaling_is_position_interpolation_and_ntk_changes_base():
    pos = torch.tensor([[0, 8, 16]])
    c_lin, s_lin = rope_tables(pos, 8, scaling="linear", factor=4.0)
    c_ref, s_ref = rope_tables(pos // 4, 8)
    torch.testing.assert_close((c_lin, s_lin), (c_ref, s_ref))
    c_ntk, _ = rope_tables(pos, 8, base=10000.0, scaling="ntk", factor=4.0)
    c_base, _ = rope_tables(pos, 8, base=10000.0 * 4.0 ** (8 / 6))
    torch.testing.assert_close(c_ntk, c_base)
