"""The GPU suite's train section (benchmarks/gpu_suite.py): short bf16 training runs of the small
model, one per attention kind, with a plain torch loop (no DeepSpeed, no Hydra).

Per run (dense D, s2 S, infllm_v2 I, linear L, mixed: conf/attention/mixed.yaml's pattern):

    model      ltrain.models.transformer.Transformer, sizes of conf/model/small.yaml (~125M
               parameters, 12 heads of 64, 4 KV heads); sections of conf/attention/s2-paper.yaml,
               infllm_v2-paper.yaml (dense up to 8192 tokens, sparse beyond) and linear.yaml
    data       one fixed batch of uniform random tokens [1, 16384 + 1] (--max-seq-len caps it), so
               the loss must fall as the model memorises it
    step       autocast bf16 forward (fp32 weights), fp32 cross-entropy (mean over tokens), backward, clip at
               optim.grad_clip, torch.optim.AdamW (fused on CUDA) with conf/optim/adamw.yaml's
               lr, betas, eps, weight decay, linear warm-up over the first third of the steps
    reported   tokens/s over steps 2.. (the first compiles), loss at the first and last step, peak
               memory (torch.cuda.max_memory_allocated), each kind's attention mode (attn_stats);
               pass iff every loss is finite and the last below the first.

A run stops early, recording the steps it made, when the section's budget runs out. A dry run
trains conf/model/tiny.yaml with one layer per letter of the pattern at 256 tokens, in fp32
(CPU autocast is not the GPU's mixed precision), with conf/attention/mixed.yaml's CPU-scaled
sections.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time

import torch
import torch.nn.functional as F

from benchmarks.gpu_suite import Settings, conf

SEQ_LEN = 16384  # above InfLLM-V2's dense_len (8192): its layers train sparse
DRY_SEQ_LEN = 256


def configs(pattern: str, dry_run: bool):
    """(ModelConfig, AttentionConfig) of a run: the small model (tiny for a dry run) and the
    attention sections of the presets named in the module docstring."""
    from ltrain.config import AttentionConfig, ModelConfig

    if dry_run:
        model, mixed = {**conf("model/tiny.yaml"), "n_layers": len(pattern)}, conf("attention/mixed.yaml")
        sections = {name: mixed[name] for name in ("s2", "infllm_v2", "linear")}
    else:
        model = conf("model/small.yaml")
        sections = {"s2": conf("attention/s2-paper.yaml")["s2"],
                    "infllm_v2": conf("attention/infllm_v2-paper.yaml")["infllm_v2"],
                    "linear": conf("attention/linear.yaml")["linear"]}
    attn = AttentionConfig(pattern=pattern)
    attn = dataclasses.replace(attn, **{name: dataclasses.replace(getattr(attn, name), **values)
                                        for name, values in sections.items()})
    return ModelConfig(**model), attn


def _modes(kinds: list[str], stats: dict) -> str:
    """"s2 sparse, dense dense": the mode each kind's layers reported in the last forward."""
    modes = {}
    for i, kind in enumerate(kinds):
        mode = stats.get(f"attn/layer{i}/mode")
        if mode is not None:
            modes.setdefault(kind, set()).add(mode)
    return ", ".join(f"{kind} {'/'.join(sorted(m))}" for kind, m in modes.items()) or "-"


def _run(pattern: str, settings: Settings, section):
    def run() -> dict:
        from ltrain.models.transformer import Transformer

        dev = torch.device(settings.device)
        cuda = dev.type == "cuda"
        model_cfg, attn_cfg = configs(pattern, settings.dry_run)
        optim = conf("optim/adamw.yaml")
        n = DRY_SEQ_LEN if settings.dry_run else min(SEQ_LEN, settings.max_seq_len)
        torch.manual_seed(0)
        model = Transformer(model_cfg, attn_cfg).to(dev)
        opt = torch.optim.AdamW(model.parameters(), lr=optim["lr"], betas=(optim["beta1"], optim["beta2"]),
                                eps=optim["eps"], weight_decay=optim["weight_decay"], fused=cuda)
        warmup = max(1, settings.steps // 3)
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup))
        tokens = torch.randint(model_cfg.vocab_size, (1, n + 1), generator=torch.Generator(device=dev).manual_seed(0),
                               device=dev)
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            section.skip("peak memory: torch.cuda memory statistics need a GPU")
            section.skip("bf16 autocast: the dry run trains in fp32 (CPU autocast is not the GPU's mixed precision)")
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
        losses = []
        for step in range(settings.steps):
            with amp:
                logits = model(inputs)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), optim["grad_clip"])
            opt.step()
            schedule.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach())  # read once at the end: no host sync per step
            if step == 0:
                if cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
            elif section.time_left() <= 0:
                break
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        losses = torch.stack(losses).tolist()
        timed = len(losses) - 1
        ok = all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
        return {"pattern": pattern, "tokens_per_step": n, "steps": len(losses),
                "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
                "tokens_per_s": timed * n / elapsed if timed else None,
                "loss_first": losses[0], "loss_last": losses[-1], "losses": losses,
                "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                "modes": _modes(model.kinds, model.attn_stats),
                "status": "pass" if ok else "fail",
                **({} if len(losses) == settings.steps else {"why": "section budget ran out"})}

    return run


def train_cases(settings: Settings, section) -> list:
    runs = {"dense": "D", "s2": "S", "infllm_v2": "I", "linear": "L", "mixed": conf("attention/mixed.yaml")["pattern"]}
    return [(name, _run(pattern, settings, section)) for name, pattern in runs.items()]
