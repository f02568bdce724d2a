"""`ltrain-convert`: Hugging Face Llama-family checkpoints in and out of ltrain.

    ltrain-convert hf-to-ltrain SRC_DIR DST_DIR [--name NAME]
    ltrain-convert ltrain-to-hf CKPT_DIR DST_DIR [--run-dir RUN_DIR]

hf-to-ltrain reads a transformers checkpoint directory (config.json through
transformers' AutoConfig; weights through safetensors, one `model.safetensors`
or the shards a `model.safetensors.index.json` lists) of model_type llama,
mistral (without a sliding window) or qwen2 (q/k/v biases: model.qkv_bias),
and writes DST_DIR:

    ltrain_weights.safetensors   the weights under ltrain's Transformer names
    model.yaml                   the matching `model=` preset
    model/<NAME>.yaml            the same preset, where `--config-dir DST_DIR` finds it

    ltrain-train --config-dir DST_DIR model=NAME trainer.init_from=DST_DIR ...

HF checkpoints and ltrain share the rotary layout (rotate the first half of each
head against the second), so q/k weights map over unpermuted. `trainer.init_from`
loads the weights into any attention pattern: dense, s2 and infllm_v2 layers use
the q/k/v/o projections as they are; linear layers take them too (an
approximation: softmax weights in linear attention) and keep their own
out_norm / decay at init.

ltrain-to-hf exports a checkpoint step directory (any ZeRO stage, merged by
DeepSpeed's zero_to_fp32; ltrain.eval.load_model) of a run whose layers are all
softmax kinds to a directory `LlamaForCausalLM.from_pretrained` loads
(config.json, model.safetensors). S2 and InfLLM-V2 layers export with a
warning: transformers runs them as dense attention.

Errors are one line, `ltrain-convert: error: ...`, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Optional

import torch

from ltrain.config import INIT_WEIGHTS
from ltrain.errors import ConfigError

log = logging.getLogger("ltrain.convert")

PRESET = "model.yaml"
SUPPORTED = ("llama", "mistral", "qwen2")
HF_INDEX = "model.safetensors.index.json"
HF_SINGLE = "model.safetensors"
# HF per-layer names -> ltrain's, under model.layers.<i>. / layers.<i>.
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn.wq.weight",
    "self_attn.k_proj.weight": "attn.wk.weight",
    "self_attn.v_proj.weight": "attn.wv.weight",
    "self_attn.o_proj.weight": "attn.wo.weight",
    "post_attention_layernorm.weight": "mlp_norm.weight",
    "mlp.gate_proj.weight": "mlp.w1.weight",
    "mlp.up_proj.weight": "mlp.w3.weight",
    "mlp.down_proj.weight": "mlp.w2.weight",
}
BIAS_NAMES = {"self_attn.q_proj.bias": "attn.wq.bias", "self_attn.k_proj.bias": "attn.wk.bias",
              "self_attn.v_proj.bias": "attn.wv.bias"}
GLOBAL_NAMES = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight",
                "lm_head.weight": "head.weight"}
# Parameters of a linear layer that softmax weights do not have: they keep their init under init_from.
LINEAR_ONLY = ("attn.out_norm.weight", "attn.decay_log_rate")
# ModelConfig's settings of a rope scaling -> transformers' rope_parameters keys.
ROPE_KEYS = {
    "llama3": {"rope_low_freq_factor": "low_freq_factor", "rope_high_freq_factor": "high_freq_factor",
               "rope_original_max_positions": "original_max_position_embeddings"},
    "yarn": {"rope_beta_fast": "beta_fast", "rope_beta_slow": "beta_slow",
             "rope_original_max_positions": "original_max_position_embeddings"},
}


class ConvertError(ValueError):
    """Input that cannot be converted; the message is the one line shown to the user."""


# ---------------------------------------------------------------- hf -> ltrain


def read_hf_config(src: Path):
    """transformers' config of `src`, after checking config.json's model_type is one ltrain runs."""
    path = src / "config.json"
    if not path.is_file():
        raise ConvertError(f"{src} has no config.json: pass a Hugging Face checkpoint directory")
    try:
        raw = json.loads(path.read_text())
    except ValueError as exc:
        raise ConvertError(f"{path} is not valid JSON ({exc})") from None
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED:
        raise ConvertError(f"{path}: model_type={model_type!r} is not supported; ltrain-convert reads "
                           + ", ".join(SUPPORTED))
    if model_type == "mistral" and raw.get("sliding_window") is not None:
        raise ConvertError(f"{path}: sliding_window={raw['sliding_window']!r} is not supported (ltrain has no "
                           "sliding-window attention); only Mistral checkpoints with sliding_window null convert")
    if model_type == "qwen2" and raw.get("use_sliding_window"):
        raise ConvertError(f"{path}: use_sliding_window=true is not supported (ltrain has no sliding-window "
                           "attention)")
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(src))


def _rope(hf) -> tuple[float, dict]:
    """(rope_theta, scaling dict or {}) from transformers' rope_parameters."""
    scaling = dict(getattr(hf, "rope_parameters", None) or {})
    theta = scaling.pop("rope_theta", None) or 10000.0
    kind = scaling.get("rope_type", "default")
    return float(theta), ({} if kind == "default" else scaling)


def preset_from_hf(hf, name: str) -> dict:
    """The ltrain model preset (ModelConfig fields) of a transformers config."""
    where = "config.json"
    dim, heads = hf.hidden_size, hf.num_attention_heads
    head_dim = getattr(hf, "head_dim", None) or dim // heads
    if head_dim * heads != dim:
        raise ConvertError(f"{where}: head_dim={head_dim} x num_attention_heads={heads} != hidden_size={dim}; "
                           "ltrain's head width is hidden_size / num_attention_heads")
    if getattr(hf, "hidden_act", "silu") != "silu":
        raise ConvertError(f"{where}: hidden_act={hf.hidden_act!r} is not supported (ltrain's MLP is SwiGLU: silu)")
    if getattr(hf, "mlp_bias", False):
        raise ConvertError(f"{where}: mlp_bias=true is not supported (ltrain's MLP has no biases)")
    qkv_bias = hf.model_type == "qwen2"
    if hf.model_type == "llama" and getattr(hf, "attention_bias", False):
        raise ConvertError(f"{where}: attention_bias=true is not supported (a bias on o_proj too; ltrain has "
                           "q/k/v biases only, model.qkv_bias)")
    theta, scaling = _rope(hf)
    preset = {
        "name": name, "vocab_size": hf.vocab_size, "dim": dim, "n_layers": hf.num_hidden_layers,
        "n_heads": heads, "n_kv_heads": getattr(hf, "num_key_value_heads", None) or heads,
        "ffn_dim": hf.intermediate_size, "norm_eps": float(hf.rms_norm_eps), "rope_base": theta,
        "tie_embeddings": bool(getattr(hf, "tie_word_embeddings", False)),
    }
    if qkv_bias:
        preset["qkv_bias"] = True
    preset.update(_rope_scaling_fields(scaling, where))
    return preset


def _rope_scaling_fields(scaling: dict, where: str) -> dict:
    """ModelConfig's rope_* fields for HF's rope scaling (rope_parameters / rope_scaling)."""
    if not scaling:
        return {}
    kind = scaling["rope_type"]
    factor = float(scaling.get("factor", 1.0))
    if kind == "linear":
        return {"rope_scaling": "linear", "rope_factor": factor}
    wanted = ROPE_KEYS.get(kind)
    if wanted is None:
        raise ConvertError(f"{where}: rope scaling rope_type={kind!r} is not supported; ltrain converts "
                           "default, linear, llama3, yarn")
    out = {"rope_scaling": kind, "rope_factor": factor}
    for field_name, hf_key in wanted.items():
        if scaling.get(hf_key) is not None:
            out[field_name] = scaling[hf_key]
    if kind == "yarn" and scaling.get("attention_factor") is not None:
        raise ConvertError(f"{where}: rope scaling attention_factor={scaling['attention_factor']!r} is not "
                           "supported (ltrain uses yarn's default 0.1 ln(factor) + 1)")
    return out


def read_hf_weights(src: Path) -> dict[str, torch.Tensor]:
    """Every tensor of `src`: the shards model.safetensors.index.json lists, or model.safetensors."""
    from safetensors.torch import load_file

    index = src / HF_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ConvertError(f"{index} is damaged: no weight_map ({exc})") from None
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            if not (src / shard).is_file():
                raise ConvertError(f"{index} lists shard {shard}, which is missing from {src}")
        state = {}
        for shard in shards:
            state.update(load_file(str(src / shard)))
        missing = sorted(set(weight_map) - set(state))
        if missing:
            raise ConvertError(f"{index} maps {missing[0]} to {weight_map[missing[0]]}, which does not hold it")
        return state
    if (src / HF_SINGLE).is_file():
        return load_file(str(src / HF_SINGLE))
    raise ConvertError(f"{src} has neither {HF_SINGLE} nor {HF_INDEX} (pytorch_model.bin checkpoints: re-save them "
                       "with save_pretrained(..., safe_serialization=True))")


def hf_to_ltrain_state(hf_state: dict[str, torch.Tensor], preset: dict) -> dict[str, torch.Tensor]:
    """HF Llama-family names -> ltrain Transformer names (no permutation: the same rotary layout)."""
    names = dict(GLOBAL_NAMES)
    for i in range(preset["n_layers"]):
        table = {**LAYER_NAMES, **(BIAS_NAMES if preset.get("qkv_bias") else {})}
        names.update({f"model.layers.{i}.{hf}": f"layers.{i}.{lt}" for hf, lt in table.items()})
    out = {}
    for name, tensor in hf_state.items():
        if name.endswith("rotary_emb.inv_freq"):  # a buffer older transformers saved: recomputed from rope_base
            continue
        if name == "lm_head.weight" and preset["tie_embeddings"]:
            continue  # tied: the embedding is the head
        if name not in names:
            raise ConvertError(f"weight {name} has no place in an ltrain model (model_type llama / mistral / qwen2 "
                               "names expected)")
        out[names[name]] = tensor.contiguous()
    needed = set(names.values()) - ({"head.weight"} if preset["tie_embeddings"] else set())
    missing = sorted(needed - set(out))
    if missing:
        hf_name = next(k for k, v in names.items() if v == missing[0])
        raise ConvertError(f"the checkpoint has no {hf_name} (ltrain {missing[0]})")
    return out


def write_preset(dst: Path, preset: dict, source: str) -> None:
    from omegaconf import OmegaConf

    text = (f"# ltrain model preset converted from {source} by `ltrain-convert hf-to-ltrain`;\n"
            f"# weights: {INIT_WEIGHTS} next to this file (trainer.init_from={dst}).\n"
            + OmegaConf.to_yaml(OmegaConf.create(preset)))
    (dst / PRESET).write_text(text)
    (dst / "model").mkdir(exist_ok=True)
    (dst / "model" / f"{preset['name']}.yaml").write_text(text)


def hf_to_ltrain(src: str | Path, dst: str | Path, name: Optional[str] = None) -> dict:
    """Convert; returns the preset written to `dst`/model.yaml."""
    from safetensors.torch import save_file

    from ltrain.config import ModelConfig

    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise ConvertError(f"{src} is not a directory: pass a Hugging Face checkpoint directory")
    name = name or re.sub(r"[^A-Za-z0-9_.-]+", "-", src.resolve().name).strip("-.") or "hf"
    preset = preset_from_hf(read_hf_config(src), name)
    try:
        ModelConfig(**preset)
    except TypeError as exc:  # a field this ltrain does not have
        raise ConvertError(f"this ltrain cannot hold the model: {exc}") from None
    state = hf_to_ltrain_state(read_hf_weights(src), preset)
    dst.mkdir(parents=True, exist_ok=True)
    save_file(state, str(dst / INIT_WEIGHTS), metadata={"format": "pt", "ltrain_preset": name,
                                                          "source": str(src.resolve())})
    write_preset(dst, preset, str(src.resolve()))
    return preset


# ---------------------------------------------------------------- trainer.init_from


def preset_name(init_dir: str | Path) -> str:
    path = Path(init_dir) / PRESET
    try:
        from omegaconf import OmegaConf

        return str(OmegaConf.load(path).name)
    except Exception:  # noqa: BLE001 - only for the hint in an error message
        return f"<the preset in {path}>"


def is_checkpoint_step(path: str | Path) -> bool:
    """A finished ltrain checkpoint step directory (`<run>/checkpoints/step_<N>`, its manifest written)."""
    from ltrain.checkpoint import MANIFEST

    return (Path(path) / MANIFEST).is_file()


def load_init_weights(model: torch.nn.Module, init_dir: str | Path) -> list[str]:
    """Copy the weights of `init_dir` into `model` (a Transformer, before DeepSpeed wraps it): either
    `init_dir`/ltrain_weights.safetensors (ltrain-convert hf-to-ltrain) or, for a checkpoint step
    directory of an ltrain run, its model weights (any ZeRO stage, merged: ltrain.eval.checkpoint_weights).

    Every tensor must fit the model's parameter of that name; every model parameter must be in the
    file except a linear layer's own ones (LINEAR_ONLY: kept at init). ConfigError (one line) otherwise.
    Returns the indices of the linear layers that took softmax weights (for the caller's warning)."""
    key = f"trainer.init_from={str(init_dir)!r}"
    if is_checkpoint_step(init_dir):
        from ltrain.eval import checkpoint_weights

        hint = f"use the model settings of the run that wrote it ({Path(init_dir).parents[1] / 'config.yaml'})"
        state = checkpoint_weights(init_dir)
    else:
        from safetensors.torch import load_file

        hint = f"use model={preset_name(init_dir)} (its preset: {Path(init_dir) / PRESET})"
        state = load_file(str(Path(init_dir) / INIT_WEIGHTS))
    own = model.state_dict()
    for name, tensor in state.items():
        if name not in own:
            raise ConfigError(f"{key}: {name} is in the checkpoint but not in the model; {hint}")
        if tuple(tensor.shape) != tuple(own[name].shape):
            raise ConfigError(f"{key}: {name} has shape {list(tensor.shape)} in the checkpoint but "
                              f"{list(own[name].shape)} in the model; {hint}")
    kinds = getattr(model, "kinds", [])
    linear = [i for i, kind in enumerate(kinds) if kind == "linear"]
    for name in own:
        if name in state:
            continue
        m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
        if not (m and int(m.group(1)) in linear and m.group(2) in LINEAR_ONLY):
            raise ConfigError(f"{key}: the checkpoint has no {name}; {hint}")
    with torch.no_grad():
        for name, tensor in state.items():
            own[name].copy_(tensor)
    return linear


# ---------------------------------------------------------------- ltrain -> hf


def _find_run_dir(ckpt: Path) -> Path:
    for parent in (ckpt.parent, ckpt.parent.parent):
        if (parent / "config.yaml").is_file():
            return parent
    raise ConvertError(f"no config.yaml of the run in {ckpt.parent} or {ckpt.parent.parent}: pass --run-dir RUN_DIR "
                       "(the directory ltrain-train wrote config.yaml to)")


def _step_dir(path: Path) -> Path:
    """A step directory as given, or the newest complete one under a checkpoints or run directory."""
    from ltrain.checkpoint import MANIFEST, step_dirs

    if (path / MANIFEST).is_file():
        return path
    base = path / "checkpoints" if (path / "checkpoints").is_dir() and not step_dirs(str(path)) else path
    complete = [p for _, p in step_dirs(str(base)) if os.path.exists(os.path.join(p, MANIFEST))]
    if not complete:
        raise ConvertError(f"{path} holds no complete checkpoint (no {MANIFEST}): pass a step_* directory of a run")
    return Path(complete[-1])


def hf_config_from(cfg) -> "object":
    """transformers.LlamaConfig of an ltrain TrainConfig's model."""
    from transformers import LlamaConfig

    from ltrain.nn.layers import swiglu_hidden

    m = cfg.model
    head_dim = m.dim // m.n_heads
    rope = {"rope_type": "default", "rope_theta": m.rope_base}
    if m.rope_scaling == "linear":
        rope = {"rope_type": "linear", "factor": m.rope_factor, "rope_theta": m.rope_base}
    elif m.rope_scaling == "ntk":  # ltrain's static NTK is a larger base, which plain RoPE takes as it is
        rope["rope_theta"] = m.rope_base * m.rope_factor ** (head_dim / (head_dim - 2))
    elif m.rope_scaling in ("llama3", "yarn"):
        rope = {"rope_type": m.rope_scaling, "factor": m.rope_factor, "rope_theta": m.rope_base,
                **{hf: getattr(m, lt) for lt, hf in ROPE_KEYS[m.rope_scaling].items()}}
    elif m.rope_scaling != "none":
        raise ConvertError(f"model.rope_scaling={m.rope_scaling!r} has no transformers equivalent here")
    max_pos = max(cfg.data.seq_len, int(rope.get("original_max_position_embeddings", 0)) + 1)
    return LlamaConfig(
        vocab_size=m.vocab_size, hidden_size=m.dim, intermediate_size=swiglu_hidden(m.dim, m.ffn_dim, m.multiple_of),
        num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads, num_key_value_heads=m.n_kv_heads,
        head_dim=head_dim, rms_norm_eps=m.norm_eps, rope_parameters=rope, tie_word_embeddings=m.tie_embeddings,
        max_position_embeddings=max_pos, hidden_act="silu", attention_bias=False, mlp_bias=False,
        architectures=["LlamaForCausalLM"], dtype="float32",
    )


def ltrain_to_hf_state(state: dict[str, torch.Tensor], n_layers: int, tied: bool) -> dict[str, torch.Tensor]:
    back = {v: k for k, v in GLOBAL_NAMES.items()}
    for i in range(n_layers):
        back.update({f"layers.{i}.{lt}": f"model.layers.{i}.{hf}" for hf, lt in LAYER_NAMES.items()})
    out = {}
    for name, tensor in state.items():
        if name not in back:
            raise ConvertError(f"parameter {name} has no Llama equivalent")
        out[back[name]] = tensor.detach().float().contiguous().clone()
    if tied:
        out.pop("lm_head.weight", None)
    return out


def ltrain_to_hf(ckpt: str | Path, dst: str | Path, run_dir: Optional[str | Path] = None) -> list[str]:
    """Export; returns the warnings (also logged)."""
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    from ltrain.eval import load_model

    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise ConvertError(f"{ckpt} is not a directory: pass a checkpoint step_* directory of a run")
    ckpt = _step_dir(ckpt)
    run_dir = Path(run_dir) if run_dir else _find_run_dir(ckpt)
    if not (run_dir / "config.yaml").is_file():
        raise ConvertError(f"{run_dir} has no config.yaml: pass the run directory ltrain-train wrote")
    saved = OmegaConf.load(run_dir / "config.yaml")  # the kinds first: refuse before reading any weights
    from ltrain.attention.registry import resolve_layer_kinds

    attn = saved.get("attention", {})
    kinds = resolve_layer_kinds(attn.get("pattern", "D"), attn.get("layers"), saved.model.n_layers)
    pattern = attn.get("pattern", "D") if not attn.get("layers") else ",".join(attn.layers)
    if "linear" in kinds:
        where = ", ".join(str(i) for i, k in enumerate(kinds) if k == "linear")
        raise ConvertError(f"attention.pattern={pattern} has linear layers ({where}); Llama has no linear attention, "
                           "so only runs of softmax kinds (dense, s2, infllm_v2) export")
    if saved.model.get("qkv_bias", False):
        raise ConvertError("model.qkv_bias=true: Llama has no q/k/v biases, so this run does not export as Llama")
    model, cfg = load_model(run_dir, ckpt)
    warnings = []
    sparse = sorted({k for k in kinds if k != "dense"})
    if sparse:
        warnings.append(f"attention.pattern={pattern}: {', '.join(sparse)} layers export as their dense q/k/v/o "
                        "weights; transformers runs them as dense attention")
    hf_cfg = hf_config_from(cfg)
    state = ltrain_to_hf_state(model.state_dict(), cfg.model.n_layers, cfg.model.tie_embeddings)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    hf_cfg.save_pretrained(str(dst))
    save_file(state, str(dst / HF_SINGLE), metadata={"format": "pt"})
    for w in warnings:
        log.warning("%s", w)
    return warnings


# ---------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ltrain-convert", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("hf-to-ltrain", help="a Hugging Face Llama / Mistral / Qwen2 directory -> ltrain weights + preset")
    a.add_argument("src", metavar="SRC_DIR")
    a.add_argument("dst", metavar="DST_DIR")
    a.add_argument("--name", help="the preset's name (default: SRC_DIR's name)")
    b = sub.add_parser("ltrain-to-hf", help="an ltrain checkpoint -> a LlamaForCausalLM directory")
    b.add_argument("ckpt", metavar="CKPT_DIR", help="a step_* directory (or a run / checkpoints dir: its newest)")
    b.add_argument("dst", metavar="DST_DIR")
    b.add_argument("--run-dir", help="the run's directory holding config.yaml (default: found above CKPT_DIR)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="ltrain-convert: %(levelname)s: %(message)s")
    for noisy in ("DeepSpeed", "deepspeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        if args.command == "hf-to-ltrain":
            preset = hf_to_ltrain(args.src, args.dst, args.name)
            dst = os.path.abspath(args.dst)
            print(f"wrote {dst}/{INIT_WEIGHTS} and the preset {dst}/{PRESET} (model={preset['name']}); train from it:\n"
                  f"  ltrain-train --config-dir {dst} model={preset['name']} trainer.init_from={dst}")
        else:
            ltrain_to_hf(args.ckpt, args.dst, args.run_dir)
            print(f"wrote {os.path.abspath(args.dst)} (config.json, {HF_SINGLE}); load it with "
                  f"transformers.LlamaForCausalLM.from_pretrained({os.path.abspath(args.dst)!r})")
    except (ConvertError, ConfigError) as exc:
        print(f"ltrain-convert: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a checkpoint error, a transformers error: one line too
        from ltrain.checkpoint import CheckpointError

        if not isinstance(exc, (CheckpointError, OSError, RuntimeError)):
            raise
        print(f"ltrain-convert: error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
