"""The chunked loss (ltrain/loss.py) against F.cross_entropy of the full logits: value and
gradients with respect to the hidden states and the head weight, ignored labels, context
parallelism on real gloo ranks, the model's output hook, and no [T, V] tensor ever built."""

from functools import partial

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ltrain.config import TrainConfig
from ltrain.loss import chunked_lm_loss, lm_loss
from tests.multiproc import run_ranks


def _inputs(b=2, n=37, dim=16, vocab=50, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, dim, generator=g, dtype=dtype).requires_grad_()
    w = (0.5 * torch.randn(vocab, dim, generator=g, dtype=dtype)).requires_grad_()
    y = torch.randint(0, vocab, (b, n), generator=g)
    y[0, :9] = -100  # a whole chunk of ignored labels at chunk=8, and a partial one
    y[1, 20] = -100
    return x, w, y


def _loss_and_grads(loss_fn, x, w):
    loss, loss_sum, count = loss_fn()
    gx, gw = torch.autograd.grad(loss, (x, w))
    return loss.detach(), loss_sum, count, gx, gw


@pytest.mark.parametrize("chunk", [1, 8, 37, 1024])  # one token; not dividing B N = 74; one chunk per row; all
def test_chunked_matches_full_logits_in_value_and_gradients(chunk):
    x, w, y = _inputs()
    ref = _loss_and_grads(lambda: lm_loss(x @ w.t(), y), x, w)
    got = _loss_and_grads(lambda: chunked_lm_loss(x, w, y, chunk=chunk), x, w)
    assert got[2] == ref[2] == 74 - 10
    for a, b, what in zip(got, ref, ("loss", "loss_sum", "count", "d x", "d weight")):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=what)


def test_bf16_matches_full_logits_within_bf16_rounding():
    x, w, y = _inputs(dtype=torch.bfloat16)
    ref = _loss_and_grads(lambda: lm_loss(x @ w.t(), y), x, w)
    got = _loss_and_grads(lambda: chunked_lm_loss(x, w, y, chunk=8), x, w)
    assert got[3].dtype == got[4].dtype == torch.bfloat16
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(got[3:], ref[3:]):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=1e-4)


def test_without_grad_only_the_value():
    x, w, y = _inputs()
    with torch.no_grad():
        loss, loss_sum, count = chunked_lm_loss(x, w, y, chunk=8)
        ref = lm_loss(x @ w.t(), y)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, ref[0], rtol=1e-6, atol=1e-7)


class LargestTensor(TorchDispatchMode):
    """The largest number of elements of any tensor an aten op returned while active."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def test_no_tensor_holds_the_logits_of_the_whole_sequence():
    vocab, dim, chunk = 500, 8, 16
    x, w, y = _inputs(b=2, n=64, dim=dim, vocab=vocab)
    with LargestTensor() as chunked:
        chunked_lm_loss(x, w, y, chunk=chunk)[0].backward()
    with LargestTensor() as full:
        lm_loss(x @ w.t(), y)[0].backward()
    assert full.numel == 2 * 64 * vocab  # the plain loss does build them: the probe sees it
    assert chunked.numel == chunk * vocab


def test_chunk_must_be_positive():
    x, w, y = _inputs()
    with pytest.raises(ValueError, match="chunk must be a positive number of tokens, got 0"):
        chunked_lm_loss(x, w, y, chunk=0)


def _cp_rank(rank, world_size, chunk):
    import torch.distributed as dist

    x, w, y = _inputs(n=40)
    shard = slice(rank * 40 // world_size, (rank + 1) * 40 // world_size)  # each rank a piece of every row
    xs = x.detach()[:, shard].clone().requires_grad_()
    ws = w.detach().clone().requires_grad_()
    got = _loss_and_grads(lambda: chunked_lm_loss(xs, ws, y[:, shard], dist.group.WORLD, chunk=chunk), xs, ws)
    ref = _loss_and_grads(lambda: lm_loss(xs @ ws.t(), y[:, shard], dist.group.WORLD), xs, ws)
    return got, ref


def test_context_parallel_ranks_reproduce_the_full_sequence_loss():
    """2 gloo ranks: each rank's chunked loss equals the plain loss under the same cp group, and the
    cp average of the ranks' losses and gradients (what the engine computes) is the full sequence's."""
    x, w, y = _inputs(n=40)
    full = _loss_and_grads(lambda: lm_loss(x @ w.t(), y), x, w)
    ranks = run_ranks(_cp_rank, 2, 8)
    for got, ref in ranks:
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(sum(got[0] for got, _ in ranks) / 2, full[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(torch.cat([got[3] for got, _ in ranks], dim=1) / 2, full[3], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(sum(got[4] for got, _ in ranks) / 2, full[4], rtol=1e-6, atol=1e-7)


def _bf16_cp_rank(rank, world_size):
    import torch.distributed as dist

    x, w, y = _inputs(n=40, dtype=torch.bfloat16)
    shard = slice(rank * 40 // world_size, (rank + 1) * 40 // world_size)
    xs, ws = x.detach()[:, shard].clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss, loss_sum, count = chunked_lm_loss(xs, ws, y[:, shard], dist.group.WORLD, chunk=1024)
    gx, gw = torch.autograd.grad(loss, (xs, ws))
    return loss.detach(), loss_sum, count, gx.dtype, gw.dtype


def test_bf16_loss_and_its_context_parallel_normalisation_are_fp32():
    """trainer.precision=bf16: the model hands the loss bf16 hidden states and weights. The
    cross-entropy, the summed loss and the cp normalisation (token count over the cp group) are
    fp32, so the cp mean of 2 gloo ranks' losses is the full rows' token mean of the same bf16
    logits to fp32 rounding (1e-6 relative), not to bf16's (4e-3); the gradients come back in bf16."""
    x, w, y = _inputs(n=40, dtype=torch.bfloat16)
    logits = (x.detach() @ w.detach().t()).double()  # the bf16 matmul the loss runs, then exact CE
    want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)
    ranks = run_ranks(_bf16_cp_rank, 2)
    for loss, loss_sum, count, gx_dtype, gw_dtype in ranks:
        assert loss.dtype == loss_sum.dtype == torch.float32
        assert (gx_dtype, gw_dtype) == (torch.bfloat16, torch.bfloat16)
    assert sum(r[2] for r in ranks).item() == (y != -100).sum().item()
    cp_mean = sum(r[0].double() for r in ranks) / 2
    torch.testing.assert_close(cp_mean, want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("tie", [True, False])
def test_model_output_hook_gives_the_logits_loss(tie):
    """Transformer(..., output=chunked loss) against lm_loss of its logits: loss and every parameter's
    gradient (the tied embedding gets both the lookup's and the head's share)."""
    from ltrain.models.transformer import Transformer

    cfg = TrainConfig()
    cfg.model.vocab_size, cfg.model.dim, cfg.model.n_layers, cfg.model.tie_embeddings = 64, 32, 2, tie
    cfg.attention.pattern = "DL"
    torch.manual_seed(0)
    model = Transformer(cfg.model, cfg.attention)
    ids = torch.randint(0, 64, (2, 32))
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = -100

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    ref_loss = lm_loss(model(ids), labels)[0]
    ref = grads(ref_loss)
    loss = model(ids, output=partial(chunked_lm_loss, labels=labels, chunk=24))[0]
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-7)
    for name, g in grads(loss).items():
        torch.testing.assert_close(g, ref[name], rtol=1e-5, atol=1e-7, msg=name)
