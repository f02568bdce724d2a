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
