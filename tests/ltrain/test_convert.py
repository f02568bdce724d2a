"""`ltrain-convert`: Hugging Face checkpoints in (logits equal to transformers'), trainer.init_from,
and back out of a real (ZeRO-3) training run to a directory LlamaForCausalLM loads. fp32, no network."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers  # a test dependency (pyproject's test extra), as is safetensors
from omegaconf import OmegaConf

from ltrain.config import INIT_WEIGHTS, AttentionConfig, ModelConfig, TrainConfig, validate
from ltrain.convert import hf_to_ltrain, load_init_weights, main
from ltrain.errors import ConfigError
from ltrain.models.transformer import Transformer

REPO = Path(__file__).resolve().parents[2]
SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
             intermediate_size=128)


def save_hf(path: Path, kind: str = "llama", shard: bool = False, **extra) -> torch.nn.Module:
    """A random transformers model of `kind`, saved to `path` (sharded: several files and an index)."""
    torch.manual_seed(0)
    if kind == "mistral":
        cfg, cls = transformers.MistralConfig(**SMALL, **{"sliding_window": None, **extra}), transformers.MistralForCausalLM
    elif kind == "qwen2":
        cfg, cls = transformers.Qwen2Config(**SMALL, **extra), transformers.Qwen2ForCausalLM
    else:
        cfg, cls = transformers.LlamaConfig(**SMALL, **extra), transformers.LlamaForCausalLM
    model = cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):  # not the init's ones / zeros: they must map too
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path, max_shard_size="100KB" if shard else "5GB")
    assert (path / "model.safetensors.index.json").exists() == shard
    return model


def ltrain_model(dst: Path, attention: AttentionConfig | None = None) -> Transformer:
    """ltrain's Transformer from the written model.yaml, with the converted weights."""
    model_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(dst / "model.yaml")))
    model = Transformer(model_cfg, attention or AttentionConfig())
    load_init_weights(model, dst)
    return model.eval()


def logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return getattr(out, "logits", out)


@pytest.mark.parametrize("kind, shard, extra", [
    ("llama", False, {"rope_theta": 500000.0}),
    ("llama", True, {}),
    ("mistral", False, {"tie_word_embeddings": True}),
    ("qwen2", False, {}),
    ("llama", False, {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
    ("llama", False, {"max_position_embeddings": 512, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}}),
    ("llama", False, {"max_position_embeddings": 256, "rope_scaling": {
        "rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0, "original_max_position_embeddings": 64}}),
])
def test_hf_to_ltrain_gives_transformers_logits(tmp_path, capsys, kind, shard, extra):
    hf = save_hf(tmp_path / "hf", kind, shard, **extra)
    assert main(["hf-to-ltrain", str(tmp_path / "hf"), str(tmp_path / "lt"), "--name", "mine"]) == 0
    out = capsys.readouterr().out
    assert f"--config-dir {tmp_path / 'lt'} model=mine trainer.init_from={tmp_path / 'lt'}" in out
    preset = OmegaConf.load(tmp_path / "lt" / "model.yaml")
    assert preset.name == "mine" and preset.dim == 64 and preset.ffn_dim == 128 and preset.n_kv_heads == 2
    assert preset.get("qkv_bias", False) == (kind == "qwen2")
    assert preset.tie_embeddings == (kind == "mistral")
    assert (tmp_path / "lt" / "model" / "mine.yaml").read_text() == (tmp_path / "lt" / "model.yaml").read_text()
    assert preset.get("rope_scaling", "none") == extra.get("rope_scaling", {}).get("rope_type", "none")
    ids = torch.randint(0, 300, (2, 48), generator=torch.Generator().manual_seed(1))
    ours = ltrain_model(tmp_path / "lt")
    torch.testing.assert_close(logits(ours, ids), logits(hf, ids), rtol=0, atol=1e-5)
    if kind != "qwen2":  # the export's LlamaConfig (rope scaling included) runs the same weights alike
        from ltrain.convert import hf_config_from

        llama = transformers.LlamaForCausalLM(hf_config_from(TrainConfig(model=ours.cfg))).eval()
        llama.load_state_dict(hf.state_dict(), strict=not preset.tie_embeddings)
        torch.testing.assert_close(logits(llama, ids), logits(hf, ids), rtol=0, atol=1e-5)


def test_init_from_fits_every_attention_kind(tmp_path):
    """s2 / infllm_v2 / linear layers take the dense weights; linear layers keep their own extras at init."""
    save_hf(tmp_path / "hf")
    hf_to_ltrain(tmp_path / "hf", tmp_path / "lt")
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "lt" / INIT_WEIGHTS))
    for layers, linear in ((["s2", "infllm_v2"], []), (["linear", "dense"], [0])):
        model = Transformer(OmegaConf.to_object(OmegaConf.merge(
            OmegaConf.structured(ModelConfig), OmegaConf.load(tmp_path / "lt" / "model.yaml"))),
            AttentionConfig(layers=layers))
        assert load_init_weights(model, tmp_path / "lt") == linear
        state = model.state_dict()
        for name, t in weights.items():
            assert torch.equal(state[name], t), name


def test_round_trip_through_a_zero3_training_run(tmp_path):
    """HF -> ltrain -> `ltrain.train` (trainer.init_from, ZeRO-3, one step at lr 1e-9) -> HF again."""
    hf = save_hf(tmp_path / "hf")
    lt = tmp_path / "lt"
    assert main(["hf-to-ltrain", str(tmp_path / "hf"), str(lt), "--name", "conv"]) == 0
    env = {**os.environ, "LTRAIN_RUN_ID": "test", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "ltrain.train", "--config-dir", str(lt), "model=conv", f"trainer.init_from={lt}",
         f"trainer.out_dir={tmp_path}", "attention=dense", "trainer.max_steps=1", "data.seq_len=128",
         "data.micro_batch_size=1", "optim.lr=1e-9", "parallel.zero_stage=3", "trainer.progress=false"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"initialized the weights from trainer.init_from={lt}" in proc.stderr
    step = tmp_path / "test" / "checkpoints" / "step_00000001"
    assert any(step.glob("zero_pp_rank_*_model_states.pt"))  # a ZeRO-3 layout: the weights are partitioned

    assert main(["ltrain-to-hf", str(step), str(tmp_path / "back")]) == 0
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "back").eval()
    from ltrain.eval import checkpoint_weights, load_model

    trained, _ = load_model(tmp_path / "test", step)
    merged = checkpoint_weights(step)
    exported = back.state_dict()
    assert torch.equal(exported["model.layers.1.self_attn.q_proj.weight"], merged["layers.1.attn.wq.weight"])
    assert torch.equal(exported["lm_head.weight"], merged["head.weight"])
    for name, t in hf.state_dict().items():  # one step at lr 1e-9 leaves the imported weights where they were
        torch.testing.assert_close(exported[name], t, rtol=0, atol=1e-6)

    # The ZeRO-3 step directory itself seeds a new run (trainer.init_from=<step dir>): the merged weights,
    # into any attention pattern.
    seeded = Transformer(trained.cfg, AttentionConfig(layers=["s2", "infllm_v2"]))
    assert load_init_weights(seeded, step) == []
    for name, t in seeded.state_dict().items():
        assert torch.equal(t, merged[name]), name
    from ltrain.checkpoint import MANIFEST
    from ltrain.config import CHECKPOINT_MANIFEST

    assert CHECKPOINT_MANIFEST == MANIFEST  # the config check's copy of the name
    cfg = TrainConfig()
    cfg.trainer.init_from = str(step)
    validate(cfg, world_size=1)
    ids = torch.randint(0, 300, (2, 48), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(logits(back, ids), logits(trained, ids), rtol=0, atol=1e-5)
    torch.testing.assert_close(logits(back, ids), logits(hf, ids), rtol=0, atol=1e-4)


def _one_line_error(capsys, argv) -> str:
    capsys.readouterr()  # what saving the HF model printed
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ltrain-convert: error: ") and "\n" not in err, err
    return err


def test_unsupported_model_type_names_the_field(tmp_path, capsys):
    save_hf(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    err = _one_line_error(capsys, ["hf-to-ltrain", str(tmp_path / "hf"), str(tmp_path / "lt")])
    assert "model_type='gpt2' is not supported" in err and "config.json" in err


def test_mistral_with_a_sliding_window_is_refused(tmp_path, capsys):
    save_hf(tmp_path / "hf", "mistral", sliding_window=32)
    err = _one_line_error(capsys, ["hf-to-ltrain", str(tmp_path / "hf"), str(tmp_path / "lt")])
    assert "sliding_window=32 is not supported" in err
    assert not (tmp_path / "lt").exists()


def test_a_missing_shard_is_named(tmp_path, capsys):
    save_hf(tmp_path / "hf", shard=True)
    shard = sorted(set(json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
                       ["weight_map"].values()))[1]
    (tmp_path / "hf" / shard).unlink()
    err = _one_line_error(capsys, ["hf-to-ltrain", str(tmp_path / "hf"), str(tmp_path / "lt")])
    assert f"lists shard {shard}, which is missing" in err


def test_shape_mismatch_names_parameter_shapes_and_preset(tmp_path):
    save_hf(tmp_path / "hf")
    hf_to_ltrain(tmp_path / "hf", tmp_path / "lt", name="conv")
    model = Transformer(ModelConfig(vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=128,
                                    tie_embeddings=False), AttentionConfig())
    with pytest.raises(ConfigError) as exc:
        load_init_weights(model, tmp_path / "lt")
    msg = str(exc.value)
    assert "\n" not in msg
    assert "layers.0.attn.wk.weight has shape [32, 64] in the checkpoint but [64, 64] in the model" in msg
    assert "use model=conv" in msg


def test_init_from_must_hold_converted_weights_or_be_a_checkpoint(tmp_path):
    cfg = TrainConfig()
    cfg.trainer.init_from = str(tmp_path)  # a directory, but no ltrain weights in it (e.g. the HF dir itself)
    with pytest.raises(ConfigError, match=f"trainer.init_from='{tmp_path}' is invalid: .*{INIT_WEIGHTS}.*"
                                          "checkpoint step directory"):
        validate(cfg, world_size=1)


def test_linear_runs_do_not_export(tmp_path, capsys):
    """Refused from the run's config.yaml, before any weights are read."""
    run = tmp_path / "run"
    step = run / "checkpoints" / "step_00000001"
    step.mkdir(parents=True)
    (step / "ltrain_complete.json").write_text(json.dumps({"step": 1, "files": {}}))
    cfg = OmegaConf.structured(TrainConfig)
    cfg.attention.pattern = "DL"
    cfg.model.n_layers = 2
    OmegaConf.save(cfg, run / "config.yaml")
    err = _one_line_error(capsys, ["ltrain-to-hf", str(step), str(tmp_path / "out")])
    assert "attention.pattern=DL has linear layers (1)" in err
