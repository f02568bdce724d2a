"""Packed documents through the whole model (Transformer.forward(..., doc_ids=)), for
every attention kind and a mix of them:

- oracle: a packed row of documents (boundaries inside blocks, one document shorter
  than a block) with positions restarting per document gives, for each document's
  tokens, the logits of that document run alone (its own row, positions from 0), and
  the parameter gradients of a loss summed over the documents equal the sum of the
  documents' own (fp32);
- causality with documents: changing token t never changes a logit before t;
- context parallelism: on 2 and 4 gloo ranks (ring, Ulysses, LASP-2 / LASP-2H for a
  hybrid model) the packed model's logits and gradients equal one process's.

The presets are the CPU ones of conf/attention, with two overrides where the oracle
needs the sparse layout to cover a document: S2's local band spans the row (the
layout counts blocks of the whole row, so a document alone would see other stripes:
tests/ltrain/attention/test_s2.py tests that choice), and InfLLM-V2's top-k covers
each document's blocks (the row runs sparse, 256 > dense_len 128, each document alone,
shorter than 128, dense).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.ltrain.models.test_causality import attention_config, model_config
from tests.multiproc import run_ranks

from ltrain.models.transformer import Transformer

N = 256
# Two rows of four documents: boundaries inside 16-token blocks, one of 5 tokens
# (shorter than a block and than an InfLLM-V2 summary window), each under 128 tokens.
ROW_LENGTHS = ([40, 5, 100, 111], [111, 60, 7, 78])
COVER = {"s2": {"local_blocks": N // 16}, "infllm_v2": {"topk": 8}}  # see the module doc

# name -> (conf/attention presets merged in order, pattern or None, section overrides)
MODELS = {
    "dense": (["dense"], None, {}),
    "s2": (["s2"], None, COVER),
    "infllm_v2-dense": (["infllm_v2"], None, {"infllm_v2": {"dense_len": N}}),
    "infllm_v2-sparse": (["infllm_v2"], None, COVER),
    "linear": (["linear"], None, {}),
    "hybrid": (["hybrid"], None, {}),
    "mixed-SILD": (["s2", "infllm_v2", "linear", "dense"], "SILD", COVER),
}


def build(name: str) -> Transformer:
    presets, pattern, overrides = MODELS[name]
    attn = attention_config(presets, pattern)
    for section, values in overrides.items():
        for key, value in values.items():
            setattr(getattr(attn, section), key, value)
    torch.manual_seed(0)
    return Transformer(model_config(), attn).float()


def packed_batch(seed: int = 0):
    """ids, positions (restarting per document), doc_ids int32 [2, N]."""
    docs = torch.stack([torch.repeat_interleave(torch.arange(len(ls)), torch.tensor(ls)) for ls in ROW_LENGTHS])
    starts = torch.stack([torch.repeat_interleave(torch.cumsum(torch.tensor([0] + ls[:-1]), 0), torch.tensor(ls))
                          for ls in ROW_LENGTHS])
    ids = torch.randint(0, model_config().vocab_size, (2, N), generator=torch.Generator().manual_seed(seed))
    return ids, torch.arange(N) - starts, docs.to(torch.int32)


def spans():
    """(row, start, end) of every document."""
    out = []
    for b, ls in enumerate(ROW_LENGTHS):
        start = 0
        for n in ls:
            out.append((b, start, start + n))
            start += n
    return out


def check_sparse_paths(model: Transformer, name: str) -> None:
    """The packed row runs InfLLM-V2's sparse mode where the model's name says so."""
    for i, kind in enumerate(model.kinds):
        if kind == "infllm_v2":
            assert model.attn_stats[f"attn/layer{i}/mode"] == ("dense" if name == "infllm_v2-dense" else "sparse")


def param_grads(model: Transformer) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("name", list(MODELS))
def test_packed_documents_equal_each_document_alone(name):
    model = build(name)
    ids, positions, docs = packed_batch()
    weights = torch.randn(2, N, model.cfg.vocab_size, generator=torch.Generator().manual_seed(1))
    model.zero_grad()
    logits = model(ids, positions, doc_ids=docs)
    check_sparse_paths(model, name)
    (logits * weights).sum().backward()
    packed_grads = param_grads(model)
    model.zero_grad()
    for b, s, e in spans():
        # Its own row, positions 0.., no doc_ids; padded at the end to whole 16-token blocks
        # (S2 needs them), which a causal model's logits before the padding never see.
        row = torch.nn.functional.pad(ids[b:b + 1, s:e], (0, -(e - s) % 16))
        alone = model(row)[:, :e - s]
        torch.testing.assert_close(logits[b:b + 1, s:e], alone, atol=1e-5, rtol=1e-5,
                                   msg=lambda m: f"{name}: document [{s}, {e}) of row {b}: {m}")
        (alone * weights[b:b + 1, s:e]).sum().backward()  # grads accumulate over the documents
    for (pname, _), got, want in zip(model.named_parameters(), packed_grads, param_grads(model)):
        assert rel_err(got, want) < 1e-5, (name, pname, rel_err(got, want))  # sums of many terms: norm-relative


@pytest.mark.parametrize("name", ["dense", "infllm_v2-sparse", "mixed-SILD"])
def test_future_token_does_not_change_past_logits_with_documents(name):
    """The preset layouts as shipped (S2 stripes, InfLLM-V2's real top-k) with documents."""
    presets, pattern, _ = MODELS[name]
    torch.manual_seed(0)
    model = Transformer(model_config(), attention_config(presets, pattern)).float().eval()
    ids, positions, docs = packed_batch(seed=2)
    with torch.no_grad():
        base = model(ids, positions, doc_ids=docs)
        for t in (44, 45, 127, 150, 207, 255):  # inside / at the start / at the end of documents and blocks
            changed = ids.clone()
            changed[:, t] = (changed[:, t] + 1) % model.cfg.vocab_size
            out = model(changed, positions, doc_ids=docs)
            assert torch.equal(out[:, :t], base[:, :t]), (name, t)
            assert not torch.equal(out[:, t], base[:, t]), (name, t)  # the probe reaches the output


def test_shipped_layouts_never_mix_documents():
    """With the presets' real sparsity (S2 stripes past the local band, InfLLM-V2's top-k
    dropping blocks), replacing every other document's tokens leaves a document's logits as
    they were."""
    torch.manual_seed(0)
    model = Transformer(model_config(), attention_config(["s2", "infllm_v2", "linear", "dense"], "SILD")).float()
    ids, positions, docs = packed_batch(seed=3)
    with torch.no_grad():
        base = model(ids, positions, doc_ids=docs)
        for b, s, e in spans():
            other = torch.randint(0, model.cfg.vocab_size, ids.shape, generator=torch.Generator().manual_seed(e))
            mine = torch.zeros_like(ids, dtype=torch.bool)
            mine[b, s:e] = True
            out = model(torch.where(mine, ids, other), positions, doc_ids=docs)
            torch.testing.assert_close(out[b, s:e], base[b, s:e], atol=1e-5, rtol=1e-5)


# ---- context parallelism -------------------------------------------------

# (model, cp_impl, split): ring for the softmax kinds, Ulysses, and a hybrid model (LASP-2, LASP-2H),
# on the model's zigzag split, and on a documents split (parallel.balance: 4 chunks per rank) whose
# mixed model runs all four kinds' CP paths (ring S2, InfLLM-V2's gathered path, LASP-2, LASP-2H).
CP_CASES = [("dense", "ring", None), ("s2", "ring", None), ("infllm_v2-sparse", "ring", None),
            ("mixed-SILD", "ulysses", None), ("hybrid", "ring", None), ("dense", "ring", "documents"),
            ("mixed-SILD", "ring", "documents")]


def _cp_vs_one_process(rank, world_size):
    from ltrain.parallel.sharding import gather_sequence, shard_sequence
    from tests.parallel.test_balance import _split_for

    group = dist.group.WORLD
    results = {}
    for name, impl, split in CP_CASES:
        model = build(name)
        ids, positions, docs = packed_batch(seed=4)
        split = model.cp_mode if split is None else _split_for(world_size, docs)
        weights = torch.randn(2, N, model.cfg.vocab_size, generator=torch.Generator().manual_seed(5))
        model.zero_grad()
        ref = model(ids, positions, doc_ids=docs)
        (ref * weights).sum().backward()
        ref_grads = param_grads(model)
        model.zero_grad()
        local = [shard_sequence(x, rank, world_size, mode=split) for x in (ids, positions, docs, weights)]
        out = model(local[0], local[1], cp_group=group, cp_impl=impl, doc_ids=local[2], cp_split=split)
        (out * local[3]).sum().backward()
        grads = param_grads(model)
        for g in grads:
            dist.all_reduce(g, group=group)
        logits = gather_sequence(out.detach(), group, mode=split)
        results[name, impl, str(split)] = rel_err(logits, ref), max(rel_err(a, b) for a, b in zip(grads, ref_grads))
    return results


def _check_cp(world_size):
    for results in run_ranks(_cp_vs_one_process, world_size, timeout=600):
        for key, (logit_err, grad_err) in results.items():
            assert logit_err < 1e-5 and grad_err < 1e-5, (key, logit_err, grad_err)


def test_packed_model_on_two_ranks_equals_one_process():
    _check_cp(2)


@pytest.mark.slow
def test_packed_model_on_four_ranks_equals_one_process():
    _check_cp(4)
