"""Evaluation of trained weights: held-out loss and passkey retrieval.

Plain functions over a `Transformer` (or, for the probes, any callable
input_ids [B, N] -> logits [B, N, V]):

    load_model(run_dir, ckpt)             weights of a checkpoint in the model of the run's config.yaml
    eval_batches(seq_len, n, seed)        fixed synthetic sequences, LongTensor [n, seq_len + 1]
    heldout_loss(model, tokens)           mean next-token cross-entropy over them
    passkey_by_depth(model, seq_len, ...) greedy passkey-retrieval accuracy at each depth
    multikey_by_depth(model, seq_len, ...) the same for the multi-key needle task (RULER's MK-NIAH)
    token_losses(model, tokens)           next-token cross-entropy at every position, [n, seq_len]

Held-out sequences come from their own data seed, so they are not the
training stream's (which samples index i of trainer.seed's stream).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from ltrain.config import TrainConfig
from ltrain.data.config import DataConfig
from ltrain.data.loader import make_batch
from ltrain.data.synthetic import SyntheticSource, multikey_accuracy, passkey_accuracy
from ltrain.loss import IGNORE_INDEX
from ltrain.models.transformer import Transformer

MODEL_STATES = "mp_rank_00_model_states.pt"  # DeepSpeed's file of the full weights (ZeRO stages 0-2)


def load_model(run_dir: str | Path, ckpt: str | Path, overrides: Optional[dict | list[str]] = None
               ) -> tuple[Transformer, TrainConfig]:
    """(model in eval mode, its config): a Transformer built from `run_dir`/config.yaml, merged over
    TrainConfig's defaults and then `overrides` (a nested dict, or dotlist strings such as
    "attention.pattern=I"), holding the weights of the checkpoint step directory `ckpt`
    (`ckpt`/mp_rank_00_model_states.pt["module"], strict: every parameter must match).

    Overrides rebuild the layers without touching the weights: attention kinds without parameters
    of their own (dense, infllm_v2) load one another's checkpoints, e.g.
    {"attention": {"pattern": "I", "layers": None}} evaluates a dense run as InfLLM-V2.
    A ZeRO checkpoint (stage 1-3, as its manifest records) is merged into full fp32 weights by
    DeepSpeed's own zero_to_fp32 helper (checkpoint_weights)."""
    cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.load(Path(run_dir) / "config.yaml"))
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides) if isinstance(overrides, list) else overrides)
    cfg = OmegaConf.to_object(cfg)
    model = Transformer(cfg.model, cfg.attention)
    model.load_state_dict(checkpoint_weights(ckpt))
    return model.eval(), cfg


def checkpoint_weights(ckpt: str | Path) -> dict[str, torch.Tensor]:
    """The model state dict of a checkpoint step directory (ltrain.checkpoint.save's layout: a DeepSpeed
    tag directory). ZeRO stages 1-3 (the manifest's `zero_stage`): the fp32 master weights, merged over
    every rank's shards by deepspeed.utils.zero_to_fp32; stage 0 (or no manifest): the weights in
    `ckpt`/mp_rank_00_model_states.pt["module"]."""
    ckpt = Path(ckpt)
    manifest = ckpt / "ltrain_complete.json"
    stage = json.loads(manifest.read_text()).get("zero_stage", 0) if manifest.exists() else 0
    if stage:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
        return {name: t.contiguous() for name, t in state.items()}
    return torch.load(ckpt / MODEL_STATES, map_location="cpu", weights_only=False)["module"]


def eval_batches(seq_len: int, n: int, seed: int, task: str = "passkey") -> torch.Tensor:
    """LongTensor [n, seq_len + 1]: samples 0..n-1 of the synthetic `task` stream with data seed `seed`
    (the default DataConfig's task settings), the same on every call."""
    src = SyntheticSource(DataConfig(kind="synthetic", task=task, seq_len=seq_len), seed)
    return torch.stack([torch.from_numpy(src.sample(i)[0]) for i in range(n)])


@torch.no_grad()
def heldout_loss(model: Transformer, tokens: torch.Tensor, batch_size: int = 8) -> tuple[float, list[str]]:
    """(mean next-token loss, layer modes) over `tokens` LongTensor [n, seq_len + 1].

    The loss is the cross-entropy of logits[:, p] = model(tokens[:, :-1])[:, p] against tokens[:, p + 1],
    averaged over all n * seq_len predicted tokens (not over batches), in batches of `batch_size`
    sequences. Modes: the "attn/layer<i>/mode" entries of `model.attn_stats` after the last batch, in
    the order the layers ran ("dense" or "sparse"; a linear layer reports none)."""
    device = next(model.parameters()).device
    total, count, modes = 0.0, 0, []
    for i in range(0, len(tokens), batch_size):
        t = tokens[i : i + batch_size].to(device)
        logits = model(t[:, :-1])  # [b, seq_len, V]
        total += F.cross_entropy(logits.flatten(0, 1).float(), t[:, 1:].flatten(), reduction="sum").item()
        count += t[:, 1:].numel()
        modes = [v for k, v in model.attn_stats.items() if k.endswith("/mode")]
    return total / count, modes


@torch.no_grad()
def passkey_by_depth(model: Callable[[torch.Tensor], torch.Tensor], seq_len: int, n: int, depths: list[float],
                     seed: int, digits: int = 5) -> dict[str, float]:
    """Greedy passkey-retrieval accuracy (ltrain.data.synthetic.passkey_accuracy) of `n` probes of
    `seq_len` tokens at each depth: {"<depth>": fraction of probes whose `digits` answer tokens are all
    the argmax prediction, ..., "mean": their mean over depths}. `model`: input_ids [B, seq_len] ->
    logits [B, seq_len, V]; probes are (seed, i) for i < n, the same at every depth."""
    out = {f"{d:g}": passkey_accuracy(model, seq_len=seq_len, n=n, depth=d, seed=seed, digits=digits)
           for d in depths}
    out["mean"] = sum(out.values()) / len(depths)
    return out


@torch.no_grad()
def multikey_by_depth(model: Callable[[torch.Tensor], torch.Tensor], seq_len: int, n: int, depths: list[float],
                      seed: int, keys: int = 4, digits: int = 5) -> dict[str, float]:
    """Greedy multi-key needle accuracy (ltrain.data.synthetic.multikey_accuracy: `keys` needles, the
    queried one at the depth) of `n` probes at each depth, as passkey_by_depth: {"<depth>": ..., "mean": ...}."""
    out = {f"{d:g}": multikey_accuracy(model, seq_len=seq_len, n=n, depth=d, seed=seed, keys=keys, digits=digits)
           for d in depths}
    out["mean"] = sum(out.values()) / len(depths)
    return out


@torch.no_grad()
def token_losses(model: Callable[[torch.Tensor], torch.Tensor], tokens: torch.Tensor, batch_size: int = 8,
                 docs: Optional[torch.Tensor] = None) -> torch.Tensor:
    """FloatTensor [n, seq_len] on the CPU (float32): the next-token cross-entropy at every position of
    `tokens` LongTensor [n, seq_len + 1], [i, p] that of logits model(tokens[i, :-1])[p] against
    tokens[i, p + 1]; its mean is heldout_loss's loss. In batches of `batch_size` sequences on the
    device of the model's parameters (ltrain-eval's loss by position bucket).

    docs: LongTensor [n, seq_len + 1], each token's document number (packed rows): the model then
    attends within each token's document with positions restarting at each document, as training
    with data.doc_boundaries does (ltrain.data.loader.make_batch), and a position whose next token
    starts another document is NaN (nothing to predict there); `model` must take doc_ids."""
    params = next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
    device = params.device if params is not None else torch.device("cpu")
    out = []
    for i in range(0, len(tokens), batch_size):
        t = tokens[i : i + batch_size]
        if docs is None:
            logits = model(t[:, :-1].to(device))  # [b, seq_len, V]
            labels = t[:, 1:]
        else:
            b = make_batch(t.numpy(), docs[i : i + batch_size].numpy())
            logits = model(b["input_ids"].to(device), positions=b["position_ids"].to(device),
                           doc_ids=b["doc_ids"].to(device))
            labels = b["labels"]
        nll = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten().to(device), reduction="none",
                              ignore_index=IGNORE_INDEX).view(t.shape[0], -1).cpu()
        out.append(nll.masked_fill(labels == IGNORE_INDEX, float("nan")))
    return torch.cat(out)
