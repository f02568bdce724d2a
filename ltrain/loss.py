"""Next-token cross-entropy that stays exact under context parallelism.

`lm_loss` takes logits [B, N, V]. `chunked_lm_loss` takes the final norm's
output x [B, N, dim] and the output projection W [V, dim] and never holds
more than `chunk` tokens' fp32 logits: at 8K tokens and a 32K vocabulary the
logits alone are 1 GiB in fp32, and F.cross_entropy keeps a log-softmax of the
same size for its backward. Both return the same triple with the same
ignore-index and context-parallel semantics.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

IGNORE_INDEX = -100


def _normalise(loss_sum: torch.Tensor, count: torch.Tensor, cp_group: Optional[dist.ProcessGroup]):
    """-> (loss to backpropagate, summed loss (detached), valid-token count).

    Each context-parallel rank holds a shard of every sequence. The gradient
    engine averages over the dp x cp group, so each rank returns
    cp * (its summed loss) / (valid tokens over the whole cp group): the cp
    average of these is exactly the token mean of the full sequences.
    """
    if cp_group is None:
        return loss_sum / count.clamp(min=1), loss_sum.detach(), count
    total = count.detach().clone()
    dist.all_reduce(total, group=cp_group)
    return loss_sum * dist.get_world_size(cp_group) / total.clamp(min=1), loss_sum.detach(), count


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, cp_group: Optional[dist.ProcessGroup] = None):
    """logits: [B, N, V], labels: [B, N] (-100 ignored) -> (loss to backpropagate, summed loss, valid-token count)."""
    loss_sum = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum")
    return _normalise(loss_sum, (labels != IGNORE_INDEX).sum(), cp_group)


def _cross_entropy_chunks(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int,
                          grad_x: bool, grad_w: bool):
    """sum_t CE(x_t W^T, y_t) over valid t, and (if asked) its gradients, `chunk` tokens at a time.

    x: [T, dim], weight: [V, dim], labels: [T] -> (loss_sum fp32 [], dx [T, dim] or None, dW fp32 [V, dim] or None).
    Per chunk: z = x_c W^T in fp32 [C, V], CE_t = logsumexp(z_t) - z_t[y_t],
    dCE/dz = softmax(z) - onehot(y) (zero on ignored rows), dx_c = dz W, dW += dz^T x_c.
    The chunk's one [C, V] fp32 buffer goes z -> exp(z - max z) -> dz in place.
    """
    loss_sum = torch.zeros((), dtype=torch.float32, device=x.device)
    dx = torch.empty_like(x) if grad_x else None
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grad_w else None
    for start in range(0, x.shape[0], chunk):
        xc, y = x[start:start + chunk], labels[start:start + chunk]
        z = (xc @ weight.t()).float()
        valid = y != IGNORE_INDEX
        y = y.masked_fill(~valid, 0)
        z_y = z.gather(1, y[:, None]).squeeze(1)
        z_max = z.amax(dim=-1, keepdim=True)
        p = z.sub_(z_max).exp_()
        total = p.sum(dim=-1)
        lse = total.log() + z_max.squeeze(1)
        loss_sum += torch.where(valid, lse - z_y, 0.0).sum()
        if not (grad_x or grad_w):
            continue
        dz = p.div_(total[:, None])  # softmax
        dz.scatter_add_(1, y[:, None], torch.full_like(total[:, None], -1.0))
        dz = dz.mul_(valid[:, None]).to(x.dtype)
        if grad_x:
            dx[start:start + chunk] = dz @ weight
        if grad_w:
            dw += dz.t() @ xc
    return loss_sum, dx, dw


class ChunkedCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of x W^T whose forward also computes the gradients.

    The gradient of a sum of CE terms is known once the chunk's softmax is:
    computing it there costs no second pass over the logits (no recompute),
    and the backward only scales the stored dx, dW by the incoming scalar
    (as Liger-Kernel's fused linear cross-entropy does): the backward needs
    neither x nor W.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:
        loss_sum, dx, dw = _cross_entropy_chunks(x, weight, labels, chunk, *ctx.needs_input_grad[:2])
        ctx.save_for_backward(dx, dw)
        ctx.weight_dtype = weight.dtype
        return loss_sum

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        dx, dw = ctx.saved_tensors
        return (None if dx is None else dx * grad.to(dx.dtype),
                None if dw is None else (dw * grad).to(ctx.weight_dtype), None, None)


def chunked_lm_loss(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                    cp_group: Optional[dist.ProcessGroup] = None, chunk: int = 1024):
    """lm_loss(x @ weight.T, labels, cp_group) without the [B, N, V] logits.

    x: [B, N, dim] (the final norm's output), weight: [V, dim] (head or tied
    embedding), labels: [B, N] (-100 ignored), chunk: tokens per fp32 logits
    block [chunk, V] -> (loss to backpropagate, summed loss, valid-token count).
    """
    if chunk < 1:
        raise ValueError(f"chunk must be a positive number of tokens, got {chunk}")
    flat_x, flat_y = x.flatten(0, 1), labels.flatten()
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        loss_sum = ChunkedCrossEntropy.apply(flat_x, weight, flat_y, chunk)
    else:  # evaluation: the loss only, no gradient buffers
        loss_sum = _cross_entropy_chunks(flat_x, weight, flat_y, chunk, False, False)[0]
    return _normalise(loss_sum, (labels != IGNORE_INDEX).sum(), cp_group)
