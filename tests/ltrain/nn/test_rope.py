import math

import pytest
import torch

from ltrain.nn.rope import apply_rotary, rope_inv_freq, rope_tables


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


# Equality with Hugging Face transformers (LlamaRotaryEmbedding, transformers 5.x API).

LLAMA32 = dict(base=500000.0, scaling="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
               original_max_positions=8192)  # Llama-3.2-1B/3B's config.json
CASES = {
    "default": dict(base=10000.0),
    "linear": dict(base=10000.0, scaling="linear", factor=4.0),
    "llama3-3.2": LLAMA32,
    "llama3-3.1": dict(LLAMA32, factor=8.0),
    "llama3-custom": dict(base=10000.0, scaling="llama3", factor=4.0, low_freq_factor=2.0, high_freq_factor=8.0,
                          original_max_positions=2048),
    "yarn": dict(base=10000.0, scaling="yarn", factor=4.0, original_max_positions=4096),
    "yarn-custom": dict(base=1000000.0, scaling="yarn", factor=8.0, original_max_positions=8192,
                        beta_fast=16.0, beta_slow=2.0),
}
HF_KEYS = dict(factor="factor", low_freq_factor="low_freq_factor", high_freq_factor="high_freq_factor",
               original_max_positions="original_max_position_embeddings", beta_fast="beta_fast",
               beta_slow="beta_slow")


def hf_rotary(head_dim: int, case: dict):
    """transformers' LlamaRotaryEmbedding for ltrain's rope settings `case`."""
    from transformers import LlamaConfig  # a test dependency (pyproject's test extra: transformers>=5)
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    params = {"rope_type": case.get("scaling", "default").replace("none", "default"), "rope_theta": case["base"]}
    if params["rope_type"] != "default":
        params.update({HF_KEYS[k]: v for k, v in case.items() if k in HF_KEYS})
    longest = int(case["factor"] * case["original_max_positions"]) if params["rope_type"] == "yarn" else 32768
    cfg = LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim,
                      max_position_embeddings=longest, rope_parameters=params)
    return LlamaRotaryEmbedding(cfg)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("name", list(CASES))
def test_tables_match_transformers_up_to_32k(name, head_dim, monkeypatch):
    """transformers computes in fp32, whose phase at position 32K is off by ~1e-3; with torch.float
    read as fp64 its own code gives the exact reference, which ltrain's fp32 tables match to 1e-6."""
    case = CASES[name]
    positions = torch.arange(32768)[None]
    with monkeypatch.context() as m:
        m.setattr(torch, "float", torch.float64)
        emb = hf_rotary(head_dim, case)
        cos_hf, sin_hf = emb(torch.zeros(1, dtype=torch.float64), positions)
    assert cos_hf.dtype == torch.float64 and cos_hf.shape == (1, 32768, head_dim)
    half = head_dim // 2
    torch.testing.assert_close(cos_hf[..., :half], cos_hf[..., half:], rtol=0, atol=0)  # halves duplicated
    cos, sin = rope_tables(positions, head_dim, **case)
    assert cos.dtype == torch.float32 and cos.shape == (1, 1, 32768, half)
    torch.testing.assert_close(cos[:, 0].double(), cos_hf[..., :half], rtol=0, atol=1e-6)
    torch.testing.assert_close(sin[:, 0].double(), sin_hf[..., :half], rtol=0, atol=1e-6)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("name", list(CASES))
def test_inv_freq_and_attention_factor_match_transformers_fp32(name, head_dim):
    """transformers as it runs (fp32): the same frequencies to fp32 rounding, the same cos/sin factor."""
    case = dict(CASES[name])
    emb = hf_rotary(head_dim, case)
    inv_freq, attention_factor = rope_inv_freq(head_dim, **case)
    assert emb.inv_freq.dtype == torch.float32
    torch.testing.assert_close(inv_freq.float(), emb.inv_freq, rtol=1e-6, atol=0)
    assert attention_factor == pytest.approx(emb.attention_scaling, rel=1e-12)
    if name.startswith("yarn"):
        assert attention_factor == pytest.approx(0.1 * math.log(case["factor"]) + 1)


def test_llama3_keeps_high_and_divides_low_frequencies():
    for case in (LLAMA32, CASES["llama3-3.1"], CASES["llama3-custom"]):
        for head_dim in (64, 128):
            plain, _ = rope_inv_freq(head_dim, base=case["base"])
            scaled, attention_factor = rope_inv_freq(head_dim, **case)
            wavelen = 2 * math.pi / plain
            high = wavelen < case["original_max_positions"] / case["high_freq_factor"]
            low = wavelen > case["original_max_positions"] / case["low_freq_factor"]
            assert high.any() and low.any() and attention_factor == 1.0
            assert torch.equal(scaled[high], plain[high])
            torch.testing.assert_close(scaled[low], plain[low] / case["factor"], rtol=1e-15, atol=0)
            mid = ~(high | low)  # between: strictly between the two, decreasing with wavelength
            assert ((scaled[mid] < plain[mid]) & (scaled[mid] > plain[mid] / case["factor"])).all()


def test_llama32_rescales_17_of_32_frequencies():
    """Llama-3.1/3.2 (head_dim 64, base 500000, factor 32, low 1, high 4, original 8192)."""
    plain, _ = rope_inv_freq(64, base=500000.0)
    scaled, _ = rope_inv_freq(64, **LLAMA32)
    changed = scaled != plain
    assert plain.numel() == 32 and int(changed.sum()) == 17
    assert changed[15:].all() and not changed[:15].any()  # the 17 lowest frequencies


def test_yarn_with_factor_one_is_plain_rope():
    for head_dim in (64, 128):
        plain, _ = rope_inv_freq(head_dim)
        yarn, attention_factor = rope_inv_freq(head_dim, scaling="yarn", factor=1.0, original_max_positions=4096)
        torch.testing.assert_close(yarn, plain, rtol=1e-15, atol=0)
        assert attention_factor == 1.0
