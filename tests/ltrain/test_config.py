"""Every config file composes; every validation error names its key."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from ltrain.config import ConfigError, TrainConfig, check_known_keys, register_configs, validate
from ltrain.kernels.s2 import s2_block_mask
from tests.kernels.test_s2 import brute_force_uncovered

CONF = Path(__file__).resolve().parents[2] / "conf"
register_configs()


def load(*overrides: str) -> TrainConfig:
    with initialize_config_module("ltrain.conf", version_base="1.3"):
        return OmegaConf.to_object(compose("train", overrides=list(overrides)))


def group_options():
    for group in sorted(p for p in CONF.iterdir() if p.is_dir() and p.name != "__pycache__"):
        for f in sorted(group.glob("*.yaml")):
            yield f"{group.name}={f.stem}"


@pytest.mark.parametrize("override", list(group_options()))
def test_every_preset_composes_and_validates(override, tmp_path):
    extra = []
    if override == "data=memmap":  # needs a real prepared corpus: made by the data tests
        src = tmp_path / "a.txt"
        src.write_text("hello world\n" * 500)
        subprocess.run([sys.executable, "-m", "ltrain.data.prepare", str(src), str(tmp_path / "out")], check=True)
        extra = [f"data.path={tmp_path / 'out'}", "data.seq_len=128"]
    with initialize_config_module("ltrain.conf", version_base="1.3"):
        check_known_keys(compose("train", overrides=[override, *extra]))
    cfg = load(override, *extra)
    assert isinstance(cfg, TrainConfig)
    validate(cfg, world_size=1)


def test_default_is_the_tiny_mixed_model_with_its_sparse_paths_active():
    cfg = load()
    assert (cfg.model.name, cfg.attention.pattern, cfg.data.kind) == ("tiny", "SILD", "synthetic")
    # InfLLM-V2 runs sparse, S2 has stripes beyond its local band, at the default length.
    assert cfg.data.seq_len > cfg.attention.infllm_v2.dense_len
    s2 = cfg.attention.s2
    assert cfg.data.seq_len // s2.block_size >= s2.local_blocks + 2 * s2.vert_stride


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.dim=-8", "model.dim"),
        ("model.n_layers=0", "model.n_layers"),
        ("model.n_kv_heads=3", "model.n_kv_heads"),
        ("optim.lr=0", "optim.lr"),
        ("trainer.precision=fp8", "trainer.precision"),
        ("parallel.zero_stage=4", "parallel.zero_stage"),
        ("model.rope_scaling=dynamic", "model.rope_scaling"),
        ("model.rope_low_freq_factor=0", "model.rope_low_freq_factor"),
        ("model.rope_high_freq_factor=0.5", "model.rope_high_freq_factor"),
        ("model.rope_original_max_positions=0", "model.rope_original_max_positions"),
        ("model.rope_beta_fast=0.5", "model.rope_beta_fast"),
        ("attention.pattern=DQ", "attention.pattern"),
        ("attention.layers=[dense,foo,dense,dense]", "attention.layers[1]"),
        ("data.kind=parquet", "data.kind"),
        ("data.seq_len=-1", "data.seq_len"),
        ("model.vocab_size=200", "model.vocab_size"),
        ("trainer.loss_chunk=0", "trainer.loss_chunk"),
        ("trainer.peak_tflops=-1.0", "trainer.peak_tflops"),
    ],
)
def test_validation_error_names_key(override, key):
    with pytest.raises(ConfigError) as err:
        validate(load(override), world_size=1)
    msg = str(err.value)
    assert key in msg and "\n" not in msg
    assert override.split("=", 1)[1].split(",")[0].strip("[") in msg


def test_llama_1b_preset_has_llama32_rope():
    """Llama-3.2-1B's config.json: rope_theta 500000, rope_scaling llama3 with factor 32, low 1, high 4, 8192."""
    m = load("model=llama-1b").model
    assert (m.rope_base, m.rope_scaling, m.rope_factor) == (500000.0, "llama3", 32.0)
    assert (m.rope_low_freq_factor, m.rope_high_freq_factor, m.rope_original_max_positions) == (1.0, 4.0, 8192)
    assert m.dim // m.n_heads == 64


def test_unknown_attention_kind_lists_allowed():
    with pytest.raises(ConfigError, match="allowed: D=dense"):
        validate(load("attention.pattern=X"), world_size=1)


def test_cp_must_divide_world_and_seq_len():
    with pytest.raises(ConfigError, match="parallel.cp=3 .*world size 4"):
        validate(load("parallel.cp=3"), world_size=4)
    with pytest.raises(ConfigError, match="parallel.dp=3"):
        validate(load("parallel.dp=3"), world_size=4)
    with pytest.raises(ConfigError, match="data.seq_len=288 .*2 x parallel.cp x block_size = 2 x 2 x 16"):
        validate(load("parallel.cp=2", "data.seq_len=288"), world_size=4)
    with pytest.raises(ConfigError, match="data.seq_len=258 .*2 x parallel.cp x block_size = 2 x 4 x 16"):
        validate(load("attention=hybrid", "parallel.cp=4", "data.seq_len=258"), world_size=4)


def test_documents_split_settings(tmp_path):
    """parallel.cp_split: auto balances exactly when rows are masked per document; documents
    without document masking, and a row that does not cut into cp x cp_split_chunks whole
    blocks, are one-line errors naming the fix."""
    from ltrain.config import document_balance

    src = tmp_path / "a.txt"
    src.write_text("hello world\n" * 500)
    subprocess.run([sys.executable, "-m", "ltrain.data.prepare", str(src), str(tmp_path / "out")], check=True)
    packed = ["data=memmap", f"data.path={tmp_path / 'out'}", "data.seq_len=256", "parallel.cp=2"]
    assert document_balance(load(*packed)) == (4, 16)
    assert document_balance(load(*packed, "parallel.cp_split=zigzag")) is None
    assert document_balance(load(*packed, "data.doc_boundaries=false")) is None
    assert document_balance(load(*packed[:-1])) is None  # cp = 1: nothing to split
    assert document_balance(load("parallel.cp=2")) is None  # synthetic rows: no documents
    validate(load(*packed), world_size=2)
    with pytest.raises(ConfigError, match=r"parallel.cp_split='documents' is invalid: .*data.doc_boundaries=true .*"
                                          r"parallel.cp_split=zigzag"):
        validate(load("parallel.cp=2", "parallel.cp_split=documents"), world_size=2)
    with pytest.raises(ConfigError, match=r"data.seq_len=192 .*parallel.cp x parallel.cp_split_chunks x block_size "
                                          r"= 2 x 4 x 16 = 128 .*parallel.cp_split_chunks"):
        validate(load(*packed[:2], "data.seq_len=192", "parallel.cp=2"), world_size=2)
    validate(load(*packed[:2], "data.seq_len=192", "parallel.cp=2", "parallel.cp_split_chunks=3"), world_size=2)
    with pytest.raises(ConfigError, match="parallel.cp_split='blocks' is invalid: allowed values are auto, zigzag, "
                                          "documents"):
        validate(load("parallel.cp_split=blocks"), world_size=1)
    with pytest.raises(ConfigError, match="parallel.cp_split_chunks=0"):
        validate(load("parallel.cp_split_chunks=0"), world_size=1)


def test_ulysses_needs_heads_divisible_by_cp():
    with pytest.raises(ConfigError, match="parallel.cp=4 .*model.n_kv_heads=3"):
        validate(load("parallel.cp=4", "parallel.cp_impl=ulysses", "model.n_heads=12", "model.n_kv_heads=3",
                      "model.dim=192"), world_size=4)
    with pytest.raises(ConfigError, match="parallel.cp=8 .*model.n_heads=4"):
        validate(load("parallel.cp=8", "parallel.cp_impl=ulysses", "data.seq_len=512"), world_size=8)


MIXES = ["SILD", "LLSI", "SDID", "SL"]


@pytest.mark.parametrize("pattern", MIXES)
@pytest.mark.parametrize("cp", [1, 2, 4])
@pytest.mark.parametrize("cp_impl", ["ring", "ulysses"])
def test_every_mix_of_kinds_validates_under_cp(pattern, cp, cp_impl):
    """One zigzag split serves every kind, so any mix is accepted wherever the lengths divide."""
    overrides = ["attention=mixed", f"attention.pattern={pattern}",
                 f"parallel.cp={cp}", f"parallel.cp_impl={cp_impl}", "data.seq_len=512"]
    validate(load(*overrides), world_size=cp)


@pytest.mark.parametrize("attention", ["dense", "s2", "s2-paper", "infllm_v2", "infllm_v2-paper", "linear",
                                       "hybrid"])
@pytest.mark.parametrize("cp", [2, 4])
@pytest.mark.parametrize("cp_impl", ["ring", "ulysses"])
def test_every_preset_under_cp_validates_or_names_the_key(attention, cp, cp_impl):
    """Accepted here, or refused here with the key: never inside a collective."""
    try:
        validate(load(f"attention={attention}", f"parallel.cp={cp}", f"parallel.cp_impl={cp_impl}"), world_size=cp)
    except ConfigError as exc:
        assert str(exc).split("=")[0] in ("data.seq_len", "parallel.cp"), exc


def test_infllm_v2_settings_are_checked_at_config_time():
    with pytest.raises(ConfigError, match="attention.infllm_v2.kernel_stride"):
        validate(load("attention=infllm_v2", "attention.infllm_v2.kernel_stride=16"), world_size=1)


def test_missing_data_path_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="data.path"):
        validate(load("data=memmap", f"data.path={tmp_path / 'nope'}"), world_size=1)


def test_wrong_type_is_rejected_at_compose_time():
    with pytest.raises(ConfigCompositionException, match="model.dim"):
        load("model.dim=1.5")
    with pytest.raises(ConfigCompositionException, match="not_a_key"):
        load("model.not_a_key=1")


@pytest.mark.parametrize("override, match", [
    ("+attention.infllm_v2.granularity=64", r"^attention.infllm_v2.granularity is not a setting: selection is per "
                                            r"query token.*not causal"),
    ("+trainer.max_step=10", r"^trainer.max_step is not a setting \(closest: trainer.max_steps\), fix or remove"),
])
def test_an_added_key_the_schema_lacks_is_an_error_not_dropped(override, match):
    """`+key=...` passes Hydra's struct check; TrainConfig would drop it silently."""
    with initialize_config_module("ltrain.conf", version_base="1.3"):
        dcfg = compose("train", overrides=["attention=infllm_v2", override])
    with pytest.raises(ConfigError, match=match):
        check_known_keys(dcfg)


def test_infllm_v2_lse_is_checked_at_config_time():
    with pytest.raises(ConfigError, match="attention.infllm_v2.lse='approx': allowed exact, coarse"):
        validate(load("attention=infllm_v2", "attention.infllm_v2.lse=approx"), world_size=1)
    validate(load("attention=infllm_v2", "attention.infllm_v2.lse=coarse"), world_size=1)


@pytest.mark.parametrize("attention, override", [
    ("s2", "attention.s2.block_size=48"),
    ("s2", "attention.s2.vert_stride=0"),
    ("s2", "attention.s2.num_dense_heads=9"),
    ("linear", "attention.linear.chunk_size=24"),
])
def test_attention_kind_settings_name_their_key(attention, override):
    key, value = override.split("=")
    with pytest.raises(ConfigError, match=rf"^{key}={value} is invalid"):
        validate(load(f"attention={attention}", override), world_size=1)



def test_learn_decay_needs_a_decay():
    with pytest.raises(ConfigError, match=r"^attention.linear.learn_decay=True is invalid: needs attention.linear.decay"):
        validate(load("attention=linear", "attention.linear.decay=false", "attention.linear.learn_decay=true"),
                 world_size=1)
    validate(load("attention=linear", "attention.linear.learn_decay=true"), world_size=1)


def s2_warnings(caplog, *overrides):
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ltrain.config"):
        cfg = load(*overrides)
        validate(cfg, world_size=1)
    return cfg, [r.getMessage() for r in caplog.records if r.name == "ltrain.config"]


def s2_uncovered_pairs(cfg, num_blocks):
    s2 = cfg.attention.s2
    mask = s2_block_mask(cfg.model.n_heads, num_blocks, local_blocks=s2.local_blocks, vert_stride=s2.vert_stride,
                         homo_head=s2.homo_head, head_sliding_offset=s2.head_sliding_offset,
                         num_dense_heads=s2.num_dense_heads)
    return brute_force_uncovered(mask, s2.local_blocks)


@pytest.mark.parametrize("model", ["tiny", "small", "llama-1b"])
@pytest.mark.parametrize("attention", ["s2", "s2-paper"])
def test_s2_presets_warn_iff_they_drop_context(caplog, attention, model):
    """Shipped S2 presets on every shipped model: a config-time warning iff some
    causal block pair beyond the local band is seen by no head at some length
    (brute force over the mask, long enough to hold every stripe residue).
    Only s2-paper (vert_stride 8) on the 4-head tiny model drops context."""
    cfg, logged = s2_warnings(caplog, f"attention={attention}", f"model={model}")
    s2 = cfg.attention.s2
    drops = bool(s2_uncovered_pairs(cfg, s2.local_blocks + 2 * s2.vert_stride))
    assert drops == ((attention, model) == ("s2-paper", "tiny"))
    assert len(logged) == drops


@pytest.mark.parametrize("overrides, homo", [
    (("attention=s2-paper",), False),                                          # 4 heads, stride 8
    (("attention=s2-paper", "data.seq_len=4096"), False),
    (("attention=s2", "model.n_heads=2"), False),                               # 2 heads, stride 4
    (("attention=s2", "attention.s2.homo_head=true"), True),                    # one shared pattern
    (("attention=s2-paper", "model=small", "attention.s2.homo_head=true"), True),
])
def test_s2_context_drop_warning_names_keys_and_numbers(caplog, overrides, homo):
    cfg, logged = s2_warnings(caplog, *overrides)
    assert len(logged) == 1
    msg, s2 = logged[0], cfg.attention.s2
    assert "\n" not in msg
    assert msg.startswith(f"attention.s2.vert_stride={s2.vert_stride} with model.n_heads={cfg.model.n_heads}")
    assert ("attention.s2.homo_head=true" in msg) == homo
    assert "drops context" in msg and "fix: " in msg and "attention.s2.num_dense_heads >= 1" in msg
    assert f"attention.s2.vert_stride <= {1 if homo else cfg.model.n_heads}" in msg
    # The shortest dropping sequence and the fraction at data.seq_len, against the brute force.
    long = s2_uncovered_pairs(cfg, s2.local_blocks + 2 * s2.vert_stride)
    assert f"in sequences of {(long[0][0] + 1) * s2.block_size} tokens or more" in msg
    m = cfg.data.seq_len // s2.block_size
    fraction = len(s2_uncovered_pairs(cfg, m)) / (m * (m + 1) // 2)
    assert f"({fraction:.1%} of causal block pairs at data.seq_len={cfg.data.seq_len})" in msg


@pytest.mark.parametrize("overrides", [
    ("attention=s2-paper", "attention.s2.num_dense_heads=1"),                  # a dense head sees everything
    ("attention=s2", "attention.s2.homo_head=true", "attention.s2.num_dense_heads=1"),
    ("attention=s2-paper", "model=small"),                                      # 12 heads >= 8
    ("attention=s2-paper", "attention.s2.vert_stride=4"),                       # 4 heads >= 4
    ("attention=s2-paper", "attention.pattern=D"),                              # no s2 layer
])
def test_s2_no_warning_when_heads_cover_the_context(caplog, overrides):
    assert s2_warnings(caplog, *overrides)[1] == []


def test_packed_documents_need_whole_attention_blocks(tmp_path):
    """Document masking (on by default for packed memmap rows) runs in the block-sparse
    kernels: one line naming data.seq_len, the block and the way out; unpacked rows are
    not masked, so the same length is fine with data.doc_boundaries=false."""
    src = tmp_path / "a.txt"
    src.write_text("hello world\n" * 500)
    subprocess.run([sys.executable, "-m", "ltrain.data.prepare", str(src), str(tmp_path / "out")], check=True)
    data = ["data=memmap", f"data.path={tmp_path / 'out'}", "attention=dense"]
    with pytest.raises(ConfigError, match=r"^data.seq_len=136 is invalid: packed documents are masked per attention "
                                          r"block \(data.doc_boundaries\): use a multiple of 16, or "
                                          r"data.doc_boundaries=false"):
        validate(load(*data, "data.seq_len=136"), world_size=1)
    validate(load(*data, "data.seq_len=136", "data.doc_boundaries=false"), world_size=1)
    validate(load(*data, "data.seq_len=144"), world_size=1)


@pytest.mark.parametrize("value, why", [
    ("fp16", "fp16 is refused: lightning attention's outputs and gradients are unnormalised sums"),
    ("half", "fp16 is refused"),
    ("fp64", "fp64 is refused: every attention kernel computes in fp32"),
    ("float64", "fp64 is refused"),
    ("fp8", None),
])
@pytest.mark.parametrize("attention", ["mixed", "dense"])  # refused for every kind, not only lightning's
def test_unsupported_precision_is_one_line_naming_the_setting_and_why(value, why, attention):
    with pytest.raises(ConfigError) as err:
        validate(load(f"attention={attention}", f"trainer.precision={value}"), world_size=1)
    msg = str(err.value)
    assert msg.startswith(f"trainer.precision={value!r} is invalid: allowed values are fp32, bf16 "
                          "(every attention kind; bf16 keeps fp32 master weights and an fp32 loss)"), msg
    assert "\n" not in msg
    assert (why in msg) if why else ("refused" not in msg), msg


@pytest.mark.parametrize("attention", ["mixed", "dense", "s2", "infllm_v2", "linear", "hybrid"])
def test_fp32_and_bf16_validate_for_every_kind(attention):
    for precision in ("fp32", "bf16"):
        validate(load(f"attention={attention}", f"trainer.precision={precision}"), world_size=1)


def test_unsupported_precision_stops_the_cli_with_one_line_before_any_process_group(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ltrain.train", "trainer.precision=fp16", f"trainer.out_dir={tmp_path}"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "LTRAIN_RUN_ID": "test"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "[WARNING]" not in ln]
    assert len(lines) == 1 and lines[0].startswith("ltrain: config error: trainer.precision='fp16' is invalid: "
                                                   "allowed values are fp32, bf16"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "test" / "config.yaml").exists()
