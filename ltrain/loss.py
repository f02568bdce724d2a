"""Next-token cross-entropy that stays exact under context parallelism."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, cp_group: Optional[dist.ProcessGroup] = None):
    """logits: [B, N, V], labels: [B, N] (-100 ignored) -> (loss to backpropagate, summed loss, valid-token count).

    Each context-parallel rank holds a shard of every sequence. The gradient
    engine averages over the dp x cp group, so each rank returns
    cp * (its summed loss) / (valid tokens over the whole cp group): the cp
    average of these is exactly the token mean of the full sequences.
    """
    loss_sum = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")
    count = (labels != -100).sum()
    if cp_group is None:
        return loss_sum / count.clamp(min=1), loss_sum.detach(), count
    total = count.detach().clone()
    dist.all_reduce(total, group=cp_group)
    return loss_sum * dist.get_world_size(cp_group) / total.clamp(min=1), loss_sum.detach(), count
