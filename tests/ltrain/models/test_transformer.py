import copy

import pytest
import torch

from ltrain.config import AttentionConfig, ModelConfig
from ltrain.models.transformer import Transformer


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2)
    base.update(kw)
    return ModelConfig(**base)


def test_forward_shape_and_gqa_projection_sizes():
    torch.manual_seed(0)
    model = Transformer(tiny(), AttentionConfig())
    logits = model(torch.randint(0, 64, (3, 16)))
    assert logits.shape == (3, 16, 64)
    attn = model.layers[0].attn
    assert attn.wq.out_features == 32 and attn.wk.out_features == 16


def test_causal_future_token_does_not_change_past_logits():
    torch.manual_seed(0)
    model = Transformer(tiny(), AttentionConfig()).eval()
    ids = torch.randint(0, 64, (2, 24))
    changed = ids.clone()
    changed[:, 15] = (changed[:, 15] + 1) % 64
    a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :15], b[:, :15], rtol=0, atol=0)
    assert not torch.allclose(a[:, 15:], b[:, 15:])


def test_tied_and_untied_heads():
    tied = Transformer(tiny(tie_embeddings=True), AttentionConfig())
    untied = Transformer(tiny(tie_embeddings=False), AttentionConfig())
    assert tied.head is None and untied.head is not None
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(untied) - n(tied) == 64 * 32


def test_activation_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    plain = Transformer(tiny(), AttentionConfig())
    ckpt = copy.deepcopy(plain)
    ckpt.cfg = tiny(activation_checkpointing=True)
    ids = torch.randint(0, 64, (2, 16))
    for m in (plain, ckpt):
        m(ids).square().mean().backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_positions_argument_shifts_rotary():
    """Explicit positions equal to arange reproduce the default; a uniform shift
    changes nothing (RoPE is relative), a gap between tokens does."""
    torch.manual_seed(0)
    model = Transformer(tiny(), AttentionConfig()).eval()
    ids = torch.randint(0, 64, (1, 8))
    pos = torch.arange(8)[None]
    torch.testing.assert_close(model(ids), model(ids, positions=pos))
    torch.testing.assert_close(model(ids), model(ids, positions=pos + 100), rtol=1e-4, atol=1e-5)
    gap = torch.cat([pos[:, :4], pos[:, 4:] + 100], dim=1)
    assert not torch.allclose(model(ids), model(ids, positions=gap))


@pytest.mark.parametrize("pattern, expected", [("D", ["dense", "dense"])])
def test_pattern_builds_layer_kinds(pattern, expected):
    model = Transformer(tiny(), AttentionConfig(pattern=pattern))
    assert model.kinds == expected


@pytest.mark.parametrize("scaling", ["llama3", "yarn"])
def test_rope_settings_reach_the_tables(scaling, monkeypatch):
    """Every model.rope_* setting is passed to rope_tables: the attention gets exactly its tables."""
    import ltrain.models.transformer as tr
    from ltrain.nn.rope import rope_tables

    args = dict(low_freq_factor=1.0, high_freq_factor=8.0, original_max_positions=256, beta_fast=16.0, beta_slow=2.0)
    cfg = tiny(dim=64, n_heads=2, n_kv_heads=1, rope_scaling=scaling, rope_factor=8.0,
               **{f"rope_{k}": v for k, v in args.items()})
    seen = []
    monkeypatch.setattr(tr, "rope_tables", lambda *a, **kw: seen.append(rope_tables(*a, **kw)) or seen[-1])
    Transformer(cfg, AttentionConfig()).eval()(torch.randint(0, 64, (1, 128)))

    def tables(**kw):
        return rope_tables(torch.arange(128)[None], 32, scaling=scaling, factor=8.0, **dict(args, **kw))

    torch.testing.assert_close(seen[0], tables(), rtol=0, atol=0)
    used = {"llama3": ("low_freq_factor", "high_freq_factor", "original_max_positions"),
            "yarn": ("original_max_positions", "beta_fast", "beta_slow")}[scaling]
    for key in args:  # the settings of this scaling change the tables, the others do not
        assert torch.equal(tables(**{key: args[key] * 2})[0], seen[0][0]) == (key not in used), key
