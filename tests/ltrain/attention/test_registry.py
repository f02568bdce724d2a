import pytest

from ltrain.attention.registry import known_kinds, register, resolve_layer_kinds


def test_dense_is_registered_as_D():
    assert known_kinds()["dense"] == "D"


def test_pattern_repeats_to_layer_count():
    assert resolve_layer_kinds("D", None, 3) == ["dense"] * 3


def test_explicit_layer_list_must_match_layer_count():
    with pytest.raises(ValueError, match="attention.layers has 1 entries but model.n_layers=2"):
        resolve_layer_kinds("D", ["dense"], 2)


def test_letter_collision_is_refused():
    with pytest.raises(ValueError, match="letter 'D' is taken by 'dense'"):
        register("other", "D")(lambda *a: None)


def test_each_kind_brings_its_section_and_its_validator_runs_only_when_used():
    from dataclasses import fields

    from ltrain.attention.registry import kinds
    from ltrain.config import AttentionConfig, ConfigError, TrainConfig, validate

    sections = {f.name: f.type for f in fields(AttentionConfig)}
    for name, kind in kinds().items():
        assert (name in sections) == (kind.config is not None), name
        if kind.config is not None:
            assert isinstance(getattr(AttentionConfig(), name), kind.config)
    cfg = TrainConfig()
    cfg.attention.pattern, cfg.attention.layers = "D", None
    cfg.attention.s2.block_size = 7  # no s2 layer: not S2's business
    validate(cfg, world_size=1)
    cfg.attention.pattern = "SD"
    with pytest.raises(ConfigError, match=r"attention\.s2\.block_size=7 is invalid"):
        validate(cfg, world_size=1)
