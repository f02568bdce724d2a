"""`ltrain-train`: the Hydra entry point and the training loop.

    ltrain-train model=small attention=dense trainer.max_steps=50
    torchrun --nproc_per_node=2 -m ltrain.train parallel.dp=2

Order matters: compose -> validate (no process group yet) -> topology ->
model -> DeepSpeed engine -> data -> loop.
"""

from __future__ import annotations

import logging
import os
import resource
import sys
import time
from functools import partial

import warnings

# megatron-core warns at import that Transformer Engine / Apex are absent; ltrain uses neither.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

import hydra  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402
from tqdm import tqdm  # noqa: E402

from ltrain import checkpoint, preempt, runlock  # noqa: E402
from ltrain.config import (TrainConfig, check_known_keys, check_override_keys, document_balance,  # noqa: E402
                           register_configs, resolve_run_paths, validate)
from ltrain.errors import ConfigError  # noqa: E402

log = logging.getLogger("ltrain")


def setup_logging(rank: int, run_dir: str) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if rank == 0:
        handlers.append(logging.FileHandler(os.path.join(run_dir, "train.log")))
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s: %(message)s",
                        handlers=handlers, force=True)
    for noisy in ("DeepSpeed", "deepspeed", "megatron"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def grad_norm_before_step(model: torch.nn.Module) -> float | None:
    """The reduced gradient norm where the grads still sit on the parameters.

    DeepSpeed reports a norm only when its optimizer wrapper (ZeRO >= 1 or
    bf16) computed one; for ZeRO-0 fp32 the reduced grads are on `p.grad`
    between backward and step.
    """
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else None


def shard_batch(batch: dict, topo, mode="zigzag", balance: tuple[int, int] | None = None) -> dict:
    """This rank's part of a batch: every dp rank's cp group splits the same sequences.

    -> input_ids, labels, position_ids (global positions, [B, N / cp]) on the device, and
    doc_ids (int32, split the same way) when the loader made them (data.doc_boundaries):
    every attention layer then masks across documents (ltrain.attention.context.AttnContext);
    and cp_split, the split used (`mode`, or with `balance` = (chunks per rank, block size)
    and doc_ids the parallel.balance.document_split of this batch, computed from the loader's
    host ids on every rank alike: no collective, no device sync).
    """
    from ltrain.parallel.balance import document_split  # after validation, like every collective
    from ltrain.parallel.sharding import shard_sequence

    ids = batch["input_ids"]
    positions = batch.get("position_ids")
    if positions is None:
        positions = torch.arange(ids.shape[1]).expand_as(ids)
    out = {"input_ids": ids, "labels": batch["labels"], "position_ids": positions}
    if "doc_ids" in batch:  # int32: what the kernels compare, half the bytes to copy
        out["doc_ids"] = batch["doc_ids"].to(torch.int32)
    split = mode
    if topo.cp > 1:
        if balance is not None and "doc_ids" in out:
            split = document_split(out["doc_ids"], topo.cp, *balance)
        out = {k: shard_sequence(v, topo.cp_rank, topo.cp, mode=split) for k, v in out.items()}
    return {**{k: v.to(topo.device) for k, v in out.items()}, "cp_split": split}


def attention_stats(stats: dict) -> dict:
    """Per-layer numbers the attention kinds reported (mode, attended fraction), as plain values."""
    return {k: v.item() if isinstance(v, torch.Tensor) else v for k, v in stats.items()}


def run_summary(kinds: list[str], stats: dict, losses: list[float], tokens: int, seconds: float,
                run_dir: str, flops: dict) -> str:
    """The lines rank 0 prints at the end: per layer its kind, mode and attended
    fraction (last step), the loss from first to last step, throughput (tokens/s,
    and `flops`: ltrain.flops.throughput over the run), the run dir."""
    mfu = f", MFU {flops['mfu_pct']:.1f}%" if "mfu_pct" in flops else ""
    lines = [f"done: {len(losses)} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
             f"{tokens / max(seconds, 1e-9):,.0f} tokens/s, {flops['tflops_per_device']:.3g} model TFLOP/s per "
             f"device{mfu} over the run" if losses else "done: no steps run"]
    for i, kind in enumerate(kinds):
        mode, frac = stats.get(f"attn/layer{i}/mode"), stats.get(f"attn/layer{i}/block_fraction")
        lines.append(f"  layer {i}: {kind}" + (f" ({mode})" if mode and mode != kind else "")
                     + (f", attended fraction {frac:.3f}" if frac is not None else ""))
    lines.append(f"  run dir: {run_dir}")
    return "\n".join(lines)


def train(cfg: TrainConfig, run_dir: str) -> list[float]:
    """Run the loop; returns the per-step mean losses (every rank gets the global value)."""
    # Heavy imports after validation, so a config error answers fast: DeepSpeed, megatron-core,
    # the model, its kernels and collectives (validation loads only the parameter checks of the
    # kernels the configured kinds use).
    from ltrain.data.config import doc_masking
    from ltrain.data.loader import build_loader
    from ltrain.engine import apply_config_lr, build_engine
    from ltrain.flops import flops_per_token, peak_tflops, throughput
    from ltrain.loss import chunked_lm_loss
    from ltrain.models.transformer import Transformer
    from ltrain.parallel.comm import CommMeter
    from ltrain.parallel.topology import destroy_topology, init_topology
    from ltrain.tracking import build_tracker

    resolve_run_paths(cfg, run_dir)
    checkpoint.check_writable(cfg.trainer.ckpt_dir)
    topo = init_topology(cfg.parallel.cp, cfg.parallel.backend, cfg.trainer.device)
    locks = runlock.acquire_on_rank0([run_dir, cfg.trainer.ckpt_dir])  # one writer per run dir
    os.makedirs(run_dir, exist_ok=True)
    setup_logging(topo.rank, run_dir)
    if topo.rank == 0:
        with open(os.path.join(run_dir, "config.yaml"), "w") as f:
            f.write(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
        log.info("run dir %s | world %d = dp %d x cp %d | backend %s",
                 run_dir, topo.world_size, topo.dp, topo.cp, topo.backend)

    torch.manual_seed(cfg.trainer.seed)  # identical initial weights on every rank
    model = Transformer(cfg.model, cfg.attention).to(topo.device)
    log.info("model %s: %.2fM parameters, layers %s", cfg.model.name,
             sum(p.numel() for p in model.parameters()) / 1e6, "".join(k[0].upper() for k in model.kinds))
    resume_from = checkpoint.choose(cfg.trainer.ckpt_dir, cfg.trainer.resume)
    if cfg.trainer.init_from and resume_from:
        log.info("trainer.init_from=%s not loaded: resuming from %s", cfg.trainer.init_from, resume_from)
    elif cfg.trainer.init_from:  # weights only, before DeepSpeed: optimizer and schedule start fresh
        from ltrain.convert import load_init_weights

        linear = load_init_weights(model, cfg.trainer.init_from)
        log.info("initialized the weights from trainer.init_from=%s", cfg.trainer.init_from)
        if linear and topo.rank == 0:
            log.warning("linear layers %s take the softmax q/k/v/o weights of trainer.init_from: an approximation "
                        "(linear attention from softmax weights), expect the loss to start higher and recover",
                        ",".join(map(str, linear)))
    universal = resume_from and checkpoint.universal_for(resume_from, cfg.parallel.zero_stage)
    engine = build_engine(model, cfg, load_universal=bool(universal))
    loader = build_loader(cfg.data, seed=cfg.trainer.seed, dp_rank=topo.dp_rank, dp_size=topo.dp)
    balance = document_balance(cfg)  # None: every batch splits zigzag
    if topo.cp > 1:
        log.info("cp split: %s", "zigzag (2 chunks per rank)" if balance is None else
                 f"documents, balanced per batch ({balance[0]} chunks per rank of whole {balance[1]}-token blocks; "
                 f"parallel.cp_split={cfg.parallel.cp_split})")
    if doc_masking(cfg.data):
        log.info("packed documents: every attention layer attends within its document (data.doc_boundaries)")
    resumed = checkpoint.load(engine, loader, resume_from, universal) if resume_from else None
    if resumed and (saved_lr := apply_config_lr(engine, cfg.optim.lr)):
        log.warning("optim.lr=%g differs from the checkpoint's %g: the schedule continues with optim.lr "
                    "as its peak", cfg.optim.lr, saved_lr[0])
    start = resumed.step if resumed else 0
    tracker = build_tracker(cfg.tracking, rank=topo.rank, run_dir=run_dir,
                            config=OmegaConf.to_container(OmegaConf.structured(cfg)),
                            run_id=resumed.tracker_run_id if resumed else None, start_step=start)

    tokens_per_step = cfg.data.micro_batch_size * cfg.data.seq_len * cfg.trainer.grad_accum * topo.dp
    peak = peak_tflops(topo.device, cfg.trainer.peak_tflops)
    if peak is None:
        log.info("MFU not reported: no peak FLOP/s known for %s; set trainer.peak_tflops=<one device's peak TFLOP/s>",
                 torch.cuda.get_device_name(topo.device) if topo.device.type == "cuda" else "a CPU")
    bar = tqdm(total=cfg.trainer.max_steps, initial=start, disable=topo.rank != 0 or not cfg.trainer.progress,
               desc="train", unit="step", dynamic_ncols=True, mininterval=1.0)
    losses: list[float] = []
    run_start = window_start = time.perf_counter()
    window_tokens = 0
    tokens = resumed.tokens if resumed else 0
    stop = None
    for step in range(start + 1, cfg.trainer.max_steps + 1):
        step_start = time.perf_counter()
        log_step = step % cfg.trainer.log_every == 0 or step == cfg.trainer.max_steps
        # [loss sum, token count] over micro steps, summed on the device: no host sync until the step's end.
        sums = torch.zeros(2, dtype=torch.float64, device=topo.device)
        with CommMeter() as comm:  # sequence-parallel traffic of this step (ring, LASP-2, Ulysses)
            for _ in range(cfg.trainer.grad_accum):
                batch = shard_batch(loader.next_batch(), topo, model.cp_mode, balance)
                loss, loss_sum, count = engine(
                    batch["input_ids"], batch["position_ids"], topo.cp_group, cfg.parallel.cp_impl,
                    output=partial(chunked_lm_loss, labels=batch["labels"], cp_group=topo.cp_group,
                                   chunk=cfg.trainer.loss_chunk), doc_ids=batch.get("doc_ids"),
                    cp_split=batch["cp_split"])
                engine.backward(loss)
                if engine.is_gradient_accumulation_boundary():
                    pre_clip_norm = grad_norm_before_step(model) if log_step else None  # a host sync: log steps only
                    step_lr = engine.get_lr()[0]  # the lr this step uses; step() advances the schedule
                engine.step()
                sums[0] += loss_sum
                sums[1] += count
        # Stop requests (ltrain.preempt) ride along, so every rank decides alike at this step;
        # dp x cp is the whole world (tensor and pipeline parallel sizes are 1). One host sync per step.
        flags = torch.tensor(preempt.flags(), dtype=torch.float64).to(topo.device, non_blocking=True)
        reduced = torch.cat([sums, flags])
        dist.all_reduce(reduced, group=topo.dp_cp_group)
        loss_total, token_total, *flags_total = reduced.tolist()
        stop = preempt.decide(flags_total)
        mean_loss = loss_total / token_total if token_total else float("nan")
        losses.append(mean_loss)
        step_time = time.perf_counter() - step_start
        window_tokens += tokens_per_step
        tokens += tokens_per_step
        bar.update(1)
        bar.set_postfix(loss=f"{mean_loss:.4f}", tok_s=f"{tokens_per_step / step_time:,.0f}", refresh=False)
        if log_step:
            elapsed = time.perf_counter() - window_start
            grad_norm = engine.get_global_grad_norm()
            grad_norm = pre_clip_norm if grad_norm is None else grad_norm
            layer_stats = attention_stats(model.attn_stats)
            tracker.log({
                "loss": mean_loss,
                "lr": step_lr,
                "grad_norm": float("nan") if grad_norm is None else float(grad_norm),
                "tokens_per_s": window_tokens / elapsed,
                # The window's FLOPs per token from this step's attended fractions.
                **throughput(flops_per_token(cfg, layer_stats), window_tokens / elapsed, topo.world_size, peak),
                "step_time_s": step_time,
                "peak_mem_gb": peak_memory_gb(topo.device),
                "seq_len": cfg.data.seq_len,
                **layer_stats,
                **{f"comm/{kind}_bytes": float(n) for kind, n in comm.bytes.items() if n},
            }, step=step)
            window_start, window_tokens = time.perf_counter(), 0
        every = cfg.trainer.ckpt_every
        if (every and step % every == 0) or step == cfg.trainer.max_steps or (stop and stop.save):
            checkpoint.save(engine, cfg.trainer.ckpt_dir, step=step, tokens=tokens, loader=loader,
                            tracker_run_id=tracker.run_id, keep_last=cfg.trainer.keep_last,
                            extra={"seq_len": cfg.data.seq_len, "dp": topo.dp, "cp": topo.cp,
                                   "zero_stage": cfg.parallel.zero_stage})
        if stop:
            log.info("stopped at step %d on %s: %s", step, stop.reason,
                     "checkpoint saved, the same command continues from it (trainer.resume=auto)" if stop.save
                     else "not saved, trainer.resume=auto continues from the newest complete checkpoint")
            break
    bar.close()
    if topo.rank == 0:
        run_tokens, run_s = tokens - (resumed.tokens if resumed else 0), time.perf_counter() - run_start
        layer_stats = attention_stats(model.attn_stats)
        log.info("%s", run_summary(model.kinds, layer_stats, losses, run_tokens, run_s, run_dir,
                                   throughput(flops_per_token(cfg, layer_stats), run_tokens / max(run_s, 1e-9),
                                              topo.world_size, peak)))
    tracker.finish()
    destroy_topology()
    for lock in locks:
        lock.release()
    if stop and stop.requeue and step < cfg.trainer.max_steps and topo.rank == 0:
        preempt.requeue()  # after the lock is released: the requeued job takes it
    return losses


@hydra.main(config_path="pkg://ltrain.conf", config_name="train", version_base="1.3")
def hydra_main(dcfg: DictConfig) -> None:
    try:
        check_known_keys(dcfg)
        cfg: TrainConfig = OmegaConf.to_object(dcfg)
        validate(cfg)
        train(cfg, HydraConfig.get().runtime.output_dir)
    except ConfigError as exc:
        print(f"ltrain: config error: {exc}", file=sys.stderr)
        sys.exit(2)
    except checkpoint.CheckpointError as exc:
        print(f"ltrain: checkpoint error: {exc}", file=sys.stderr)
        sys.exit(2)
    except runlock.RunLockError as exc:
        print(f"ltrain: run error: {exc}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    register_configs()
    preempt.install()  # first: a SIGUSR1 during start-up would otherwise kill the rank
    try:
        check_override_keys(sys.argv[1:])  # before Hydra, whose message for `foo=1` suggests `+foo=1`
        hydra_main()
    except ConfigError as exc:
        print(f"ltrain: config error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        # A save cut short has no manifest yet, so it is never loaded: the last complete one is.
        print("ltrain: interrupt error: stopped by Ctrl-C, rerun the same command to resume from the newest "
              "complete checkpoint", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
