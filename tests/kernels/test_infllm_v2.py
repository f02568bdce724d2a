"""InfLLM-V2 selection (PyTorch path) against the naive per-token reference,
the switchable attention against dense attention, and its causality: no
output depends on a later q, k or v, whatever the GQA ratio."""

import pytest
import torch
import torch.nn.functional as F

from ltrain.kernels import infllm_v2_attention, infllm_v2_select
from ltrain.kernels import infllm_v2, infllm_v2_ref
from ltrain.kernels.block_sparse_ref import layout_mask, masked_attention
from ltrain.kernels.infllm_v2_ref import block_scores_torch, compress_keys, pool_geometry, select_naive
from tests.kernels.test_block_sparse_cpu import half_precision_check

CPU = dict(kernel_size=8, kernel_stride=4, block_size=16, topk=4, init_blocks=1, window_size=32)


def qk(B=2, Hq=4, Hkv=2, Nq=256, Nk=256, D=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, Hq, Nq, D, generator=g), torch.randn(B, Hkv, Nk, D, generator=g)


def test_pool_geometry_is_the_papers_max_pool():
    """kernel 5, stride 4, padding 1 at the public 32 / 16 / 64 (docs/algorithms.md#pooling-onto-blocks)."""
    S, P = pool_geometry(32, 16, 64)
    assert (S + P, S, P) == (5, 4, 1)


@pytest.mark.parametrize("lse", ["exact", "coarse"])
@pytest.mark.parametrize("params", [CPU, dict(CPU, kernel_size=12, init_blocks=2, window_size=48, topk=6),
                                    dict(CPU, kernel_size=4, kernel_stride=4, topk=5)])
def test_selection_equals_naive_per_token_reference(params, lse):
    q, k = qk()
    layout = infllm_v2_select(q, k, impl="torch", lse=lse, **params)
    assert layout.counts.shape == (2, 2, 256)
    assert torch.equal(layout.block_mask(), select_naive(q, k, lse=lse, **params))


@pytest.mark.parametrize("lse", ["exact", "coarse"])
def test_query_offset_and_short_query_chunk(lse):
    q, k = qk(Nq=64, Nk=256)
    layout = infllm_v2_select(q, k, q_start=192, impl="torch", lse=lse, **CPU)
    assert torch.equal(layout.block_mask(), select_naive(q, k, q_start=192, lse=lse, **CPU))


def test_query_chunking_does_not_change_the_selection(monkeypatch):
    q, k = qk()
    whole = infllm_v2_select(q, k, impl="torch", **CPU)
    monkeypatch.setattr(infllm_v2, "CHUNK_ELEMENTS", 1)  # one block of queries per chunk
    assert torch.equal(infllm_v2_select(q, k, impl="torch", **CPU).indices, whole.indices)


def test_coarse_lse_is_the_logsumexp_over_the_coarse_windows():
    q, k = qk(Nq=128, Nk=256)
    kc2 = compress_keys(k, 32, 16)
    got = infllm_v2_ref.lse_torch(q, kc2, kernel_size=32, kernel_stride=16, q_start=128)
    pos = torch.arange(128, 256)
    s = torch.einsum("bhid,bhjd->bhij", q, kc2.repeat_interleave(2, 1)) / 32 ** 0.5
    s = s.masked_fill(~(torch.arange(kc2.shape[2]) * 16 + 31 <= pos[:, None]), float("-inf"))
    torch.testing.assert_close(got, torch.logsumexp(s, -1))


def test_token_layout_keeps_forced_blocks_and_k_slots():
    q, k = qk()
    layout = infllm_v2_select(q, k, impl="torch", **CPU)
    mask = layout.block_mask()  # [B, Hkv, 256 tokens, 16 blocks]
    i = torch.arange(256)[:, None] // 16
    j = torch.arange(16)
    forced = ((j == 0) | ((j >= i - 2) & (j <= i)))
    assert (mask | ~forced).all() and not (mask & (j > i)).any()
    assert torch.equal(layout.counts, torch.minimum(i[:, 0] + 1, torch.tensor(6)).int().expand(2, 2, 256))


def _steer(q, k, t, target_block, block_size):
    """q with token t's queries pointed at the mean key of target_block (all heads of each group)."""
    G = q.shape[1] // k.shape[1]
    q = q.clone()
    q[:, :, t] = 8 * k[:, :, target_block * block_size:(target_block + 1) * block_size].mean(2).repeat_interleave(G, 1)
    return q


# The Triton interpreter runs one program per token: its probe stays short.
@pytest.mark.parametrize("G,N,impl", [(G, N, "torch") for G in (1, 2, 4, 16) for N in (256, 512)]
                         + [(1, 128, "triton"), (16, 128, "triton")])
def test_sparse_path_is_causal(G, N, impl):
    """Perturb q (steered towards a distant key block, so the token's selection
    changes), then k and v, at the last token of several query blocks: every
    earlier output stays the same to the bit, and so do the gradients of the
    earlier outputs into the earlier positions."""
    g = torch.Generator().manual_seed(G * N)
    Hkv = 1 if G == 16 else 2
    q = torch.randn(1, G * Hkv, N, 32, generator=g)
    k, v = (torch.randn(1, Hkv, N, 32, generator=g) for _ in range(2))
    do = torch.randn(1, G * Hkv, N, 32, generator=g)

    def run(inputs, t):
        """Outputs, and the gradients of <out[:t], do[:t]> into q, k, v."""
        xs = [x.clone().requires_grad_() for x in inputs]
        out, stats = infllm_v2_attention(*xs, impl=impl, dense_len=64, **CPU)
        assert stats["mode"] == "sparse"
        return out.detach(), torch.autograd.grad((out[:, :, :t] * do[:, :, :t]).sum(), xs)

    steered = 0
    for t in ((N - 1, N // 2 + 15, 9 * 16 + 15) if impl == "torch" else (N - 1,)):
        base, base_grads = run((q, k, v), t)
        sel = infllm_v2_select(q, k, impl=impl, **CPU).indices[:, :, t]
        unpicked = [b for b in range(1, t // 16 - 2) if not (sel == b).any()]  # not init, not local, not picked
        q2 = _steer(q, k, t, unpicked[0] if unpicked else 1, 16)
        steered += not torch.equal(infllm_v2_select(q2, k, impl=impl, **CPU).indices[:, :, t], sel)
        k2, v2 = k.clone(), v.clone()
        k2[:, :, t] += 3.0
        v2[:, :, t] -= 3.0
        for inputs in ((q2, k, v), (q, k2, v2)):
            out, grads = run(inputs, t)
            assert torch.equal(out[:, :, :t], base[:, :, :t]), (G, N, t)
            assert not torch.equal(out[:, :, t], base[:, :, t])  # the probe does reach the output
            for a, b in zip(grads, base_grads):
                torch.testing.assert_close(a[:, :, :t], b[:, :, :t], atol=1e-6, rtol=0)
    assert steered, "the steering probe never changed a selection"


def sparse_vs_dense(dtype=torch.float32, **params):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, h, 128, 32, generator=g, dtype=dtype).requires_grad_() for h in (4, 2, 2))
    do = torch.randn(2, 4, 128, 32, generator=g, dtype=dtype)
    out, stats = infllm_v2_attention(q, k, v, **params)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    grads = torch.autograd.grad(out, (q, k, v), do)
    ref_grads = torch.autograd.grad(ref, (q, k, v), do)
    return out, ref, grads, ref_grads, stats


def test_topk_covering_every_block_equals_dense_forward_and_gradients():
    out, ref, grads, ref_grads, stats = sparse_vs_dense(**dict(CPU, topk=8, dense_len=64))
    assert stats == {"mode": "sparse", "block_fraction": 1.0}
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=2e-5, rtol=1e-4)


def test_short_sequence_is_bit_identical_dense():
    out, ref, grads, ref_grads, stats = sparse_vs_dense(**dict(CPU, dense_len=128))
    assert stats["mode"] == "dense"
    assert torch.equal(out, ref) and all(torch.equal(g, r) for g, r in zip(grads, ref_grads))


def test_sparse_mode_reports_fraction_and_differs_from_dense():
    out, ref, grads, _, stats = sparse_vs_dense(**dict(CPU, dense_len=64))
    # 8 query blocks, k = 6 slots per token: 16 x (1+2+3+4+5+6+6+6) of 16 x 36 causal (token, block) pairs.
    assert stats == {"mode": "sparse", "block_fraction": 33 / 36}
    assert not torch.allclose(out, ref) and all(torch.isfinite(g).all() for g in grads)


# The Triton variant takes ~1 min per dtype in the interpreter (selection and the token kernels at
# N = 256); the kernels' own half-precision tests (test_token_sparse_triton.py) cover it by default.
@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=pytest.mark.slow)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sparse_path_half_precision_within_sdpa_error(dtype, impl):
    """The sparse mode end to end (selection, token layout, token-sparse kernel) in bf16 / fp16.
    plain: SDPA with the explicit token mask of the selected layout, run in `dtype`; reference:
    that SDPA in fp32. Selection is discrete, so all three run on the same values (the fp32
    inputs are the half ones upcast): the half and fp32 selections then pick the same blocks."""
    g = torch.Generator().manual_seed(7)
    B, Hq, Hkv, N, D = 1, 4, 2, 256, 32
    params = dict(CPU, topk=3, window_size=16)  # 4 of up to 16 blocks per token
    q, do = (torch.randn(B, Hq, N, D, generator=g).to(dtype).float() for _ in range(2))
    k, v = (torch.randn(B, Hkv, N, D, generator=g).to(dtype).float() for _ in range(2))
    layout = infllm_v2_select(q.to(dtype), k.to(dtype), impl=impl, **params)
    assert torch.equal(layout.indices, infllm_v2_select(q, k, impl=impl, **params).indices)
    assert infllm_v2.attended_fraction(layout, 16) < 0.5
    mask = layout_mask(layout, B, Hq, N, N)

    def sparse(q, k, v):
        out, stats = infllm_v2_attention(q, k, v, dense_len=64, impl=impl, **params)
        assert stats["mode"] == "sparse"
        return out, torch.zeros(out.shape[:3])

    half_precision_check(dtype, sparse, lambda q, k, v: masked_attention(q, k, v, mask), q, k, v, do,
                         yardstick="SDPA with the selection's explicit token mask, run in the half dtype")


@pytest.mark.parametrize("key,value,match", [
    ("topk", 2, "topk=2 is smaller than the forced blocks"),
    ("kernel_stride", 16, "kernel_stride=16 is larger than kernel_size=8"),
    ("block_size", 24, "block_size=24 is not a multiple of kernel_stride=16"),
    ("window_size", 8, "window_size=8 is smaller than block_size=16"),
    ("block_size", 48, "block_size=48 must be one of"),
    ("init_blocks", -1, "init_blocks=-1 must be a non-negative integer"),
    ("lse", "approx", "lse='approx': allowed exact, coarse"),
])
def test_bad_parameters(key, value, match):
    params = dict(CPU, **{key: value})
    if key == "block_size" and value == 24:
        params.update(kernel_size=16, kernel_stride=16)
    q, k = qk(Nq=64, Nk=64)
    with pytest.raises(ValueError, match=match):
        infllm_v2_select(q, k, **params)


def test_bad_shapes():
    q, k = qk(Nq=72, Nk=72)
    with pytest.raises(ValueError, match="multiples of block_size=16"):
        infllm_v2_select(q, k, **CPU)
    q, k = qk()
    with pytest.raises(ValueError, match="q_start=8 must be a multiple of block_size=16"):
        infllm_v2_select(q, k, q_start=8, **CPU)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("dense_len", [0, 64])
def test_fp64_is_one_clear_value_error(dense_len, impl):
    """fp64 in either mode (dense SDPA would take it, so a run would fail only once N passes
    dense_len) and in the selection: one ValueError line naming the arguments and the fix."""
    q, k = qk(Nq=64, Nk=64)
    cast = "one of torch.float32, torch.float16, torch.bfloat16$"
    with pytest.raises(ValueError, match=rf"^infllm_v2_attention: q, k, v have dtype torch.float64.*cast q, k, v to {cast}"):
        infllm_v2_attention(q.double(), k.double(), k.double(), dense_len=dense_len, impl=impl, **CPU)
    with pytest.raises(ValueError, match=rf"^infllm_v2_select: q, k have dtype torch.float64.*cast q, k to {cast}"):
        infllm_v2_select(q.double(), k.double(), impl=impl, **CPU)
    with pytest.raises(ValueError, match=r"dtype mismatch: q torch.bfloat16, k torch.float32"):
        infllm_v2_select(q.bfloat16(), k, impl=impl, **CPU)


# ---- packed documents ----------------------------------------------------

def packed(lengths, B=1, device="cpu"):
    """int32 [B, sum(lengths)] document ids 0, 1, ... of consecutive documents of the given lengths
    (row b's lengths rotated by b, so the rows differ)."""
    rows = []
    for b in range(B):
        ls = lengths[b % len(lengths):] + lengths[:b % len(lengths)]
        rows.append(torch.repeat_interleave(torch.arange(len(ls)), torch.tensor(ls)))
    return torch.stack(rows).to(torch.int32).to(device)


# Boundaries inside blocks of 16, one document shorter than a block and than a summary window (5 < 8).
LENGTHS = [40, 5, 100, 111]


@pytest.mark.parametrize("lse", ["exact", "coarse"])
@pytest.mark.parametrize("params", [CPU, dict(CPU, kernel_size=12, init_blocks=2, window_size=48, topk=6)])
def test_selection_with_documents_equals_naive_reference(params, lse):
    q, k = qk()
    doc = packed(LENGTHS, B=2)
    layout = infllm_v2_select(q, k, impl="torch", lse=lse, q_doc=doc, k_doc=doc, **params)
    assert torch.equal(layout.block_mask(), select_naive(q, k, lse=lse, q_doc=doc, k_doc=doc, **params))
    q_c = q[:, :, 192:]  # a query chunk against all keys (the context-parallel gathered path)
    layout = infllm_v2_select(q_c, k, q_start=192, impl="torch", lse=lse, q_doc=doc[:, 192:], k_doc=doc, **params)
    assert torch.equal(layout.block_mask(),
                       select_naive(q_c, k, q_start=192, lse=lse, q_doc=doc[:, 192:], k_doc=doc, **params))


def test_selection_sees_only_the_querys_document_and_forces_its_first_blocks():
    q, k = qk(B=1)
    doc = packed(LENGTHS)
    mask = infllm_v2_select(q, k, impl="torch", q_doc=doc, k_doc=doc, **CPU).block_mask()[0]  # [Hkv, N, Mk]
    t = torch.arange(256)
    start = torch.searchsorted(doc[0], doc[0], right=False)  # first token of each token's document
    b = torch.arange(16)
    holds_own_doc = (b[None] >= (start // 16)[:, None]) & (b[None] <= (t // 16)[:, None])
    assert not (mask & ~holds_own_doc).any()
    first_block = (b[None] == (start // 16)[:, None])  # init_blocks=1: the document's first block
    local = (b[None] >= (t // 16 - 2)[:, None]) & holds_own_doc
    assert (mask | ~(first_block | local)).all()


@pytest.mark.parametrize("lse", ["exact", "coarse"])
def test_selection_of_a_document_ignores_the_other_documents(lse):
    """Summaries never span two documents: a document's picks are the same whatever the
    other documents' keys are (here: all other keys replaced)."""
    q, k = qk(B=1)
    doc = packed(LENGTHS)
    base = infllm_v2_select(q, k, impl="torch", lse=lse, q_doc=doc, k_doc=doc, **CPU).block_mask()
    for d in range(len(LENGTHS)):
        mine = doc[0] == d
        k2 = torch.where(mine[None, None, :, None], k, torch.randn_like(k) * 3)
        got = infllm_v2_select(q, k2, impl="torch", lse=lse, q_doc=doc, k_doc=doc, **CPU).block_mask()
        assert torch.equal(got[:, :, mine], base[:, :, mine]), d


def test_document_shorter_than_a_summary_window_attends_its_own_blocks():
    """A 5-token document (kernel_size 8) has no summary: no error, its tokens attend
    their document's blocks (all forced: init and local), nothing of other documents."""
    q, k = qk(B=1)
    doc = packed(LENGTHS)
    mask = infllm_v2_select(q, k, impl="torch", q_doc=doc, k_doc=doc, **CPU).block_mask()[0]
    short = torch.nonzero(doc[0] == 1).flatten()  # tokens 40..44, all in block 2
    assert mask[:, short].any(-2).nonzero()[:, 1].unique().tolist() == [2]


def _per_document(fn, x_lists, lengths):
    """fn over each document alone (its own row from position 0), concatenated along the sequence."""
    outs, start = [], 0
    for n in lengths:
        outs.append(fn(*(x[:, :, start:start + n] for x in x_lists)))
        start += n
    return torch.cat(outs, dim=2)


def _doc_oracle_case(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    N = sum(lengths)
    q, k, v = (torch.randn(1, h, N, 32, generator=g).requires_grad_() for h in (4, 2, 2))
    return q, k, v, torch.randn(1, 4, N, 32, generator=g), packed(lengths)


@pytest.mark.parametrize("dense_len", [1024, 0])  # dense mode, and sparse mode whose top-k covers each document
def test_packed_documents_equal_each_document_alone(dense_len):
    """Documents with boundaries inside blocks: each document's outputs and gradients
    are those of dense causal attention over it alone (topk + local cover its blocks)."""
    q, k, v, do, doc = _doc_oracle_case(LENGTHS)
    out, stats = infllm_v2_attention(q, k, v, impl="torch", doc_ids=doc, **dict(CPU, topk=8, dense_len=dense_len))
    assert stats["mode"] == ("dense" if dense_len else "sparse")
    sdpa = lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True, enable_gqa=True)  # noqa: E731
    ref = _per_document(sdpa, (q, k, v), LENGTHS)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), do), torch.autograd.grad(ref, (q, k, v), do)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_block_aligned_documents_select_and_attend_as_alone():
    """Documents starting on block boundaries get exactly their alone selection (same summaries,
    init and local blocks, scores) at a top-k that drops blocks, so the same outputs and gradients.
    Windows that do not overlap (kernel_size = kernel_stride), so no two blocks tie on a shared
    chunk: topk breaks ties by position, which differs between the packed row and the document alone."""
    lengths = [96, 64, 160]
    q, k, v, do, doc = _doc_oracle_case(lengths, seed=3)
    params = dict(CPU, kernel_size=4, kernel_stride=4, topk=5, dense_len=0)
    out, stats = infllm_v2_attention(q, k, v, impl="torch", doc_ids=doc, **params)
    assert stats["block_fraction"] < 1
    ref = _per_document(lambda a, b, c: infllm_v2_attention(a, b, c, impl="torch", **params)[0], (q, k, v), lengths)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), do), torch.autograd.grad(ref, (q, k, v), do)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_sparse_path_with_documents_is_causal():
    """Changing q, k, v at token t never changes an earlier output, documents included."""
    q, k, v, _, doc = _doc_oracle_case(LENGTHS, seed=5)
    params = dict(CPU, dense_len=0)
    with torch.no_grad():
        base = infllm_v2_attention(q, k, v, impl="torch", doc_ids=doc, **params)[0]
        for t in (44, 150, 255):
            q2, k2, v2 = q.clone(), k.clone(), v.clone()
            q2[:, :, t] += 3.0
            k2[:, :, t] += 3.0
            v2[:, :, t] -= 3.0
            out = infllm_v2_attention(q2, k2, v2, impl="torch", doc_ids=doc, **params)[0]
            assert torch.equal(out[:, :, :t], base[:, :, :t]), t


def test_document_ids_must_come_in_pairs_of_the_right_shape():
    q, k = qk()
    doc = packed(LENGTHS, B=2)
    with pytest.raises(ValueError, match="q_doc is given but k_doc is None"):
        infllm_v2_select(q, k, q_doc=doc, **CPU)
    with pytest.raises(ValueError, match=r"k_doc must be \[B, Nk\] = \[2, 256\] document ids"):
        infllm_v2_select(q, k, q_doc=doc, k_doc=doc[:, :128], **CPU)
