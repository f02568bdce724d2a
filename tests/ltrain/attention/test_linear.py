import torch

from ltrain.attention.context import AttnContext
from ltrain.attention.linear import LinearAttention, LinearConfig, transnormer_decay
from ltrain.config import AttentionConfig, ModelConfig
from ltrain.kernels.lightning_ref import lightning_recurrent
from ltrain.models.transformer import Transformer

CFG = ModelConfig(vocab_size=64, dim=32, n_layers=4, n_heads=4, n_kv_heads=2)


def ctx_for(n):
    return AttnContext(cos=torch.ones(1), sin=torch.zeros(1))


def test_decay_schedule_is_transnormer():
    lam = transnormer_decay(4, 1, 4)
    expected = torch.exp(-(8 * torch.arange(1, 5) / 4) * (1 - 1 / 4))
    torch.testing.assert_close(lam, expected.float())
    assert torch.all(transnormer_decay(4, 0, 4) < lam) and torch.all(lam <= 1)


def test_layer_equals_naive_recurrence_with_feature_map_and_norm():
    torch.manual_seed(0)
    layer = LinearAttention(1, CFG, LinearConfig(decay=True, chunk_size=16))
    x = torch.randn(2, 48, 32)
    out = layer(x, ctx_for(48))
    b, n = 2, 48
    q = torch.nn.functional.silu(layer.wq(x).view(b, n, 4, 8).transpose(1, 2)) * layer.scale
    k = torch.nn.functional.silu(layer.wk(x).view(b, n, 2, 8).transpose(1, 2)).repeat_interleave(2, 1)
    v = layer.wv(x).view(b, n, 2, 8).transpose(1, 2).repeat_interleave(2, 1)
    o, _ = lightning_recurrent(q, k, v, decay=layer.decay)
    ref = layer.wo(layer.out_norm(o).transpose(1, 2).reshape(b, n, -1))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_hybrid_pattern_builds_and_is_causal():
    torch.manual_seed(0)
    model = Transformer(CFG, AttentionConfig(pattern="LLLD", linear=LinearConfig(chunk_size=16))).eval()
    assert model.kinds == ["linear", "linear", "linear", "dense"]
    ids = torch.randint(0, 64, (1, 32))
    changed = ids.clone()
    changed[0, 20] = (changed[0, 20] + 1) % 64
    torch.testing.assert_close(model(ids)[:, :20], model(changed)[:, :20], rtol=0, atol=0)


def test_learned_decay_starts_at_schedule_and_gets_the_recurrence_gradient():
    torch.manual_seed(0)
    layer = LinearAttention(1, CFG, LinearConfig(decay=True, learn_decay=True, chunk_size=16))
    torch.testing.assert_close(layer.decay, transnormer_decay(4, 1, 4))
    assert [n for n, _ in layer.named_parameters()].count("decay_log_rate") == 1
    x = torch.randn(2, 40, 32)
    layer(x, ctx_for(40)).square().sum().backward()
    got = layer.decay_log_rate.grad.clone()

    layer.zero_grad()
    b, n = 2, 40
    q = torch.nn.functional.silu(layer.wq(x).view(b, n, 4, 8).transpose(1, 2)) * layer.scale
    k = torch.nn.functional.silu(layer.wk(x).view(b, n, 2, 8).transpose(1, 2)).repeat_interleave(2, 1)
    v = layer.wv(x).view(b, n, 2, 8).transpose(1, 2).repeat_interleave(2, 1)
    o, _ = lightning_recurrent(q, k, v, decay=layer.decay)
    layer.wo(layer.out_norm(o).transpose(1, 2).reshape(b, n, -1)).square().sum().backward()
    assert got.abs().min() > 0
    torch.testing.assert_close(got, layer.decay_log_rate.grad, rtol=1e-4, atol=1e-6)


def test_fixed_decay_is_not_a_parameter():
    layer = LinearAttention(1, CFG, LinearConfig(decay=True, chunk_size=16))
    assert not any("decay" in n for n, _ in layer.named_parameters())
    assert "fixed_decay" not in layer.state_dict()
    assert LinearAttention(1, CFG, LinearConfig(decay=False, chunk_size=16)).decay is None


def test_packed_documents_equal_each_document_alone():
    """ctx.doc_ids reaches the kernel: each document of a packed row gets the layer output of
    running it alone (a 1-token document, boundaries inside and on kernel chunks of 16)."""
    torch.manual_seed(0)
    layer = LinearAttention(1, CFG, LinearConfig(decay=True, chunk_size=16))
    x = torch.randn(1, 40, 32)
    bounds = [0, 5, 16, 17, 29, 40]
    doc_ids = torch.repeat_interleave(torch.arange(5, dtype=torch.int32), torch.tensor(bounds).diff())[None]
    ctx = ctx_for(40)
    ctx.doc_ids = doc_ids
    out = layer(x, ctx)
    for a, b in zip(bounds[:-1], bounds[1:]):
        torch.testing.assert_close(out[:, a:b], layer(x[:, a:b], ctx_for(b - a)), rtol=1e-5, atol=1e-5)
