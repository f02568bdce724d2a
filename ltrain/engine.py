"""DeepSpeed engine for the model: ZeRO stage, precision, accumulation, clipping
and the warmup + cosine LR schedule, all from the config.

DS_ACCELERATOR must be set before deepspeed is imported, hence the order here.
"""

from __future__ import annotations

import math
import os

import torch

os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
# DeepSpeed JIT-builds ops on first use; keep its cache out of the shared global one.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/ltrain/torch_extensions"))

import deepspeed  # noqa: E402
from torch.optim.lr_scheduler import LambdaLR  # noqa: E402

from ltrain.parallel.topology import deepspeed_mpu  # noqa: E402


def lr_lambda(step: int, *, warmup_steps: int, max_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to min_lr_ratio at max_steps (or constant)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only; norms (1-D) are left alone, as in Llama/GPT training."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def deepspeed_config(cfg, load_universal: bool = False) -> dict:
    return {
        "train_micro_batch_size_per_gpu": cfg.data.micro_batch_size,
        "gradient_accumulation_steps": cfg.trainer.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "bf16": {"enabled": cfg.trainer.precision == "bf16"},
        # Under bf16 DeepSpeed would all-reduce gradients over dp x cp, and accumulate micro steps,
        # in bf16 (its defaults follow the model dtype); summing in bf16 loses the low bits of every
        # addend, more with the world size and grad_accum. fp32, as Megatron does for bf16
        # (accumulate_allreduce_grads_in_fp32), at twice the bytes of the gradient reduction. ZeRO-0's
        # bf16 wrapper keeps its gradients on the bf16 parameters (DeepSpeed refuses fp32 accumulation
        # there), so its micro steps still add in bf16 (README, Precision).
        "communication_data_type": "fp32",
        **({"data_types": {"grad_accum_dtype": "fp32"}} if cfg.parallel.zero_stage >= 1 else {}),
        # A client torch AdamW: a config-defined optimizer would JIT-build fused_adam.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        # Resuming ZeRO shards saved on another world size (ltrain.checkpoint.universal_for).
        "checkpoint": {"load_universal": load_universal},
    }


def build_engine(model: torch.nn.Module, cfg, load_universal: bool = False):
    """-> DeepSpeed engine (optimizer and LR scheduler inside), reducing over dp x cp."""
    o = cfg.optim
    optimizer = torch.optim.AdamW(
        param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps
    )
    scheduler = LambdaLR(
        optimizer,
        lambda step: lr_lambda(
            step, warmup_steps=o.warmup_steps, max_steps=cfg.trainer.max_steps,
            schedule=o.schedule, min_lr_ratio=o.min_lr_ratio,
        ),
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(cfg, load_universal), mpu=deepspeed_mpu(), dist_init_required=False,
    )
    return engine


def apply_config_lr(engine, lr: float) -> list[float] | None:
    """After a resume, make the config's optim.lr the schedule's peak again.

    DeepSpeed restores the scheduler's base_lrs from the checkpoint while the
    schedule's shape (warmup, max_steps) comes from the config, so a changed
    optim.lr would otherwise be ignored without a word. Returns the
    checkpoint's base lrs when they differed (nothing changes otherwise, so an
    unchanged config still resumes bit for bit), else None.
    """
    sched = engine.lr_scheduler
    saved = list(sched.base_lrs)
    if all(base == lr for base in saved):
        return None
    sched.base_lrs = [lr] * len(saved)
    # The current step's lr too, not only from the next scheduler step on.
    for group, factor in zip(sched.optimizer.param_groups, sched.lr_lambdas):
        group["initial_lr"], group["lr"] = lr, lr * factor(sched.last_epoch)
    return saved

