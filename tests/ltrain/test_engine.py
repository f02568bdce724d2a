"""The real DeepSpeed engine over real gloo ranks: data-parallel gradients equal
one process's gradients on the concatenated batch."""

import math

import pytest
import torch

from ltrain.config import TrainConfig
from tests.multiproc import run_ranks


def _cfg(micro_batch: int, zero_stage: int) -> TrainConfig:
    cfg = TrainConfig()
    cfg.model.vocab_size, cfg.model.dim, cfg.model.n_layers = 260, 32, 2
    cfg.data.seq_len, cfg.data.micro_batch_size = 128, micro_batch
    cfg.parallel.zero_stage = zero_stage
    cfg.optim.grad_clip = 0.0
    return cfg


def _grads_after_one_backward(rank, world_size, micro_batch, zero_stage):
    from deepspeed.utils import safe_get_full_grad

    from ltrain.data.loader import build_loader
    from ltrain.engine import build_engine
    from ltrain.loss import lm_loss
    from ltrain.models.transformer import Transformer
    from ltrain.parallel.topology import init_topology

    cfg = _cfg(micro_batch, zero_stage)
    topo = init_topology(cp=1)
    torch.manual_seed(0)
    model = Transformer(cfg.model, cfg.attention)
    engine = build_engine(model, cfg)
    batch = build_loader(cfg.data, seed=7, dp_rank=topo.dp_rank, dp_size=topo.dp).next_batch()
    loss, _, _ = lm_loss(engine(batch["input_ids"]), batch["labels"])
    engine.backward(loss)
    return {name: safe_get_full_grad(p).clone() for name, p in engine.module.named_parameters()}


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_two_dp_ranks_match_one_rank_on_concatenated_batch(zero_stage):
    (single,) = run_ranks(_grads_after_one_backward, 1, 4, zero_stage)
    dp = run_ranks(_grads_after_one_backward, 2, 2, zero_stage)
    for name, ref in single.items():
        for rank in range(2):
            torch.testing.assert_close(dp[rank][name], ref, rtol=1e-5, atol=1e-7, msg=f"{name} rank {rank}")


def test_lr_schedule_warmup_then_cosine_to_floor():
    from ltrain.engine import lr_lambda

    kw = dict(warmup_steps=10, max_steps=110, schedule="cosine", min_lr_ratio=0.1)
    assert lr_lambda(0, **kw) == pytest.approx(0.1)
    assert lr_lambda(9, **kw) == pytest.approx(1.0)
    assert lr_lambda(60, **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_lambda(110, **kw) == pytest.approx(0.1)
    assert lr_lambda(500, **{**kw, "schedule": "constant"}) == 1.0


def _bf16_steps(rank, world_size, zero_stage):
    from ltrain.data.loader import build_loader
    from ltrain.engine import build_engine
    from ltrain.loss import lm_loss
    from ltrain.models.transformer import Transformer
    from ltrain.parallel.topology import init_topology

    cfg = _cfg(2, zero_stage)
    cfg.trainer.precision, cfg.trainer.grad_accum = "bf16", 2
    topo = init_topology(cp=1)
    torch.manual_seed(0)
    engine = build_engine(Transformer(cfg.model, cfg.attention), cfg)
    loader = build_loader(cfg.data, seed=7, dp_rank=topo.dp_rank, dp_size=topo.dp)
    losses = []
    for _ in range(4):  # two optimizer steps of two micro steps
        batch = loader.next_batch()
        loss, _, _ = lm_loss(engine(batch["input_ids"]), batch["labels"])
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return engine.communication_data_type, engine.get_data_types(), losses


@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
def test_bf16_accumulates_and_reduces_gradients_in_fp32(zero_stage):
    """trainer.precision=bf16: bf16 weights, but gradients cross the dp x cp all-reduce in fp32 and,
    from ZeRO-1 on, micro steps accumulate in fp32 (ltrain/engine.py; ZeRO-0's bf16 wrapper accumulates
    on the bf16 parameters), and every ZeRO stage trains with that on 2 ranks."""
    accum = torch.float32 if zero_stage else torch.bfloat16
    for comm_dtype, (model_dtype, accum_dtype), losses in run_ranks(_bf16_steps, 2, zero_stage):
        assert (comm_dtype, model_dtype, accum_dtype) == (torch.float32, torch.bfloat16, accum)
        assert all(math.isfinite(x) for x in losses), losses
