"""Model-level causality probe for every attention kind (docs/architecture.md#contracts:
causality holds for every kind, sparse selection included).

The tiny model (conf/model/tiny.yaml) is built with each conf/attention CPU
preset, plus one mix of every kind, at lengths where every sparse path really
runs: InfLLM-V2 past its dense_len (the layers must report mode "sparse"),
S2 past its local band (vertical stripes reach beyond it), lightning attention
past one chunk. Two probes per model:

- perturbation: changing token t leaves logits[:, :t] unchanged and changes
  logits[:, t:] (so the probe can fail). The probed t include the LAST token
  of several query blocks (where a selection made per query block would let
  the block's later tokens steer its earlier ones) and tokens inside blocks.
- gradient: d(sum logits[:, :t]) / d(embedding output at >= t) is zero and
  nonzero at < t. This sees only the differentiable path; a selection that is
  not differentiated is caught by the perturbation probe alone.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ltrain.config import AttentionConfig, ModelConfig
from ltrain.models.transformer import Transformer

REPO = Path(__file__).resolve().parents[3]
CONF = REPO / "conf"
TOL = 1e-6  # fp32; the kinds that are causal today give exactly 0
# Probes sit on the query blocks of the CPU InfLLM-V2 preset (S2's CPU blocks are the same size).
PROBE_BLOCK = OmegaConf.load(CONF / "attention" / "infllm_v2.yaml").infllm_v2.block_size

# Model name -> (attention presets merged in order, pattern override or None).
MODELS = {
    "dense": (["dense"], None),
    "s2": (["s2"], None),
    "infllm_v2": (["infllm_v2"], None),
    "linear": (["linear"], None),
    "hybrid": (["hybrid"], None),
    "mixed-SILD": (["s2", "infllm_v2", "linear", "dense"], "SILD"),
}
LENGTHS = (256, 512)
# Softmax layers' W_q, W_k are scaled by this after init. At init_std 0.02 every
# score softmax is near uniform, so the earliest query of a block (fewest
# visible chunks, largest probabilities) holds each block-score max and a
# selection made per query block never moves with the block's later tokens:
# the probe would be blind. Peaked scores, as a trained model has, make every
# token of a block able to change what top-k picks.
QK_GAIN = 10.0


def attention_config(presets: list[str], pattern: str | None) -> AttentionConfig:
    merged = OmegaConf.structured(AttentionConfig)
    for name in presets:
        merged = OmegaConf.merge(merged, OmegaConf.load(CONF / "attention" / f"{name}.yaml"))
    if pattern is not None:
        merged.pattern = pattern
    return OmegaConf.to_object(merged)


def model_config() -> ModelConfig:
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig),
                                               OmegaConf.load(CONF / "model" / "tiny.yaml")))


_CACHE: dict[str, tuple[Transformer, AttentionConfig]] = {}


def build(name: str) -> tuple[Transformer, AttentionConfig]:
    if name not in _CACHE:
        attn = attention_config(*MODELS[name])
        torch.manual_seed(0)
        model = Transformer(model_config(), attn).float().eval()
        with torch.no_grad():
            for layer in model.layers:
                if hasattr(layer.attn, "core"):  # softmax kinds (GQAttention)
                    layer.attn.wq.weight.mul_(QK_GAIN)
                    layer.attn.wk.weight.mul_(QK_GAIN)
        _CACHE[name] = (model, attn)
    return _CACHE[name]


def probe_positions(n: int) -> list[int]:
    """Last tokens of early, middle and final query blocks (past InfLLM-V2's
    forced init + local blocks, so top-k really chooses), tokens inside a
    block, the first token of a block, and the very last token."""
    bs = PROBE_BLOCK
    m = n // bs
    last_of = [bs * b + bs - 1 for b in (7, m // 2, m - 3, m - 1)]
    inside = [bs * (m // 2 + 1) + bs // 2, bs * (m - 2) + bs // 2 - 1, bs * (m // 2 + 2)]
    return sorted(set(last_of + inside))


def check_sparse_paths_active(model: Transformer, attn: AttentionConfig, n: int) -> None:
    """Fail loudly if a length would leave a sparse kind on its dense path."""
    for i, (layer, kind) in enumerate(zip(model.layers, model.kinds)):
        if kind == "infllm_v2":
            assert n > attn.infllm_v2.dense_len
            assert model.attn_stats[f"attn/layer{i}/mode"] == "sparse", model.attn_stats
            assert model.attn_stats[f"attn/layer{i}/block_fraction"] < 1.0
        elif kind == "s2":
            c = attn.s2
            assert n > c.local_blocks * c.block_size
            mask = layer.attn.core.layout(n, torch.device("cpu")).block_mask()  # [Bl, Hl, Mq, Mk]
            m = n // c.block_size
            qb, kb = torch.arange(m)[:, None], torch.arange(m)[None, :]
            causal = kb <= qb
            assert (mask & causal).sum() < causal.sum() * mask.shape[0] * mask.shape[1], "S2 layout is dense"
            far = causal & (qb - kb >= c.local_blocks)
            assert (mask & far).any(), "no vertical stripe reaches past S2's local band"
        elif kind == "linear":
            assert n > attn.linear.chunk_size  # the inter-chunk state is carried


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("name", list(MODELS))
def test_future_token_does_not_change_past_logits(name, n):
    model, attn = build(name)
    vocab = model.cfg.vocab_size
    g = torch.Generator().manual_seed(n)
    ids = torch.randint(0, vocab, (2, n), generator=g)
    with torch.no_grad():
        base = model(ids)
        check_sparse_paths_active(model, attn, n)
        leaks = {}
        for t in probe_positions(n):
            changed = ids.clone()
            changed[:, t] = (changed[:, t] + 1 + torch.randint(0, vocab - 1, (2,), generator=g)) % vocab
            out = model(changed)
            check_sparse_paths_active(model, attn, n)
            past = (out[:, :t] - base[:, :t]).abs().max().item()
            future = (out[:, t:] - base[:, t:]).abs().max().item()
            assert future > 1e-4, f"{name} N={n}: changing token {t} changed nothing at >= {t} (probe is blind)"
            if past > TOL:
                leaks[t] = past
    assert not leaks, (f"{name} N={n}: changing token t changed logits before t "
                       f"(max |diff| by t: {', '.join(f'{t}: {d:.3g}' for t, d in leaks.items())})")


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("name", list(MODELS))
def test_past_logits_have_no_gradient_from_future_positions(name, n):
    model, attn = build(name)
    g = torch.Generator().manual_seed(n + 1)
    ids = torch.randint(0, model.cfg.vocab_size, (2, n), generator=g)
    for t in probe_positions(n)[::2]:
        leaf = {}

        def as_leaf(module, inputs, output):
            leaf["x"] = output.detach().requires_grad_(True)
            return leaf["x"]

        handle = model.embed.register_forward_hook(as_leaf)
        try:
            logits = model(ids)
        finally:
            handle.remove()
        check_sparse_paths_active(model, attn, n)
        (grad,) = torch.autograd.grad(logits[:, :t].sum(), leaf["x"])
        future = grad[:, t:].abs().max().item()
        assert grad[:, :t].abs().amax(dim=(0, 2)).gt(0).all(), f"{name} N={n} t={t}: a past position has no gradient"
        assert future <= TOL, f"{name} N={n}: logits before {t} have gradient {future:.3g} from positions >= {t}"
