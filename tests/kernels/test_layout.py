import pytest
import torch

from ltrain.kernels import BlockLayout


def random_mask(*shape, density=0.4, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) < density


def test_from_block_mask_round_trip_sorted_and_padded():
    mask = random_mask(2, 3, 5, 7)
    mask[0, 0, 0] = False
    layout = BlockLayout.from_block_mask(mask)
    assert layout.counts.dtype == layout.indices.dtype == torch.int32
    assert torch.equal(layout.counts, mask.sum(-1).int())
    assert layout.max_active == int(mask.sum(-1).max())
    assert torch.equal(layout.block_mask(), mask)
    for c, row in zip(layout.counts.flatten().tolist(), layout.indices.reshape(-1, layout.max_active).tolist()):
        assert row[:c] == sorted(row[:c]) and all(x == -1 for x in row[c:])
    assert (layout.num_q_blocks, layout.num_k_blocks) == (5, 7)


def test_from_block_mask_fixed_width():
    mask = random_mask(1, 2, 4, 4, density=0.5)
    layout = BlockLayout.from_block_mask(mask, max_active=4)
    assert layout.max_active == 4 and torch.equal(layout.block_mask(), mask)


def test_from_indices_sorts_and_drops_invalid():
    # a top-k style selection: any order, -1 and out-of-range picks dropped
    idx = torch.tensor([[[[3, 0, -1, 9], [2, 1, 0, -1]]]])
    layout = BlockLayout.from_indices(idx, num_k_blocks=4)
    assert layout.counts.tolist() == [[[2, 3]]]
    assert layout.indices.tolist() == [[[[0, 3, -1, -1], [0, 1, 2, -1]]]]


def test_to_mask_token_level():
    mask = random_mask(1, 2, 3, 2)
    m = BlockLayout.from_block_mask(mask).to_mask(48, 32)
    assert m.shape == (2, 48, 32)
    assert torch.equal(m[:, ::16, ::16], mask[0])
    assert torch.equal(m[:, 5, 17], mask[0, :, 0, 1])
    mb = BlockLayout.from_block_mask(random_mask(2, 1, 3, 3)).to_mask(48, 48)
    assert mb.shape == (2, 1, 48, 48)


def test_density_full_causal():
    assert BlockLayout.full(4, 4).density() == 1.0
    assert BlockLayout.causal(4, 4).density() == 10 / 16
    assert torch.equal(BlockLayout.causal(3, 3).block_mask()[0, 0], torch.ones(3, 3, dtype=torch.bool).tril())


@pytest.mark.parametrize("q0,nq,k0,nk", [(0, 8, 0, 8), (2, 3, 1, 4), (4, 4, 0, 4), (0, 4, 4, 4), (7, 1, 6, 2)])
def test_sub_is_a_tile_of_the_block_mask(q0, nq, k0, nk):
    mask = random_mask(2, 3, 8, 8, density=0.5, seed=q0 + k0)
    tile = BlockLayout.from_block_mask(mask).sub(q0, nq, k0, nk)
    assert tile.num_q_blocks == nq and tile.num_k_blocks == nk and tile.max_active <= nk
    assert torch.equal(tile.block_mask(), mask[:, :, q0:q0 + nq, k0:k0 + nk])
    assert tile.is_empty() == (not mask[:, :, q0:q0 + nq, k0:k0 + nk].any())


def test_sub_detects_empty_tile():
    causal = BlockLayout.causal(8, 8)
    assert causal.sub(0, 4, 4, 4).is_empty()   # queries before keys
    assert not causal.sub(4, 4, 0, 4).is_empty()
    with pytest.raises(ValueError, match="key blocks"):
        causal.sub(0, 4, 6, 4)


def test_transposed_is_reverse_index_and_cached():
    mask = random_mask(1, 2, 5, 3)
    layout = BlockLayout.from_block_mask(mask)
    assert torch.equal(layout.transposed.block_mask(), mask.transpose(-1, -2))
    assert layout.transposed is layout.transposed


def test_cached_builds_once_per_key_and_per_layout():
    layout, built = BlockLayout.causal(4, 4), []

    def build(tag):
        built.append(tag)
        return [tag]

    first = layout.cached(("a", 1), lambda: build("a"))
    assert layout.cached(("a", 1), lambda: build("again")) is first and built == ["a"]
    assert layout.cached(("b", 1), lambda: build("b")) == ["b"] and built == ["a", "b"]
    assert BlockLayout.causal(4, 4).cached(("a", 1), lambda: build("c")) == ["c"]  # kept per layout object


def test_bad_construction():
    with pytest.raises(ValueError, match="int32"):
        BlockLayout(torch.zeros(1, 1, 2, dtype=torch.int64), torch.zeros(1, 1, 2, 1, dtype=torch.int32), 2)
    with pytest.raises(ValueError, match="extend"):
        BlockLayout(torch.zeros(1, 1, 2, dtype=torch.int32), torch.zeros(1, 2, 2, 1, dtype=torch.int32), 2)
    with pytest.raises(ValueError, match="block_mask"):
        BlockLayout.from_block_mask(torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="tile"):
        BlockLayout.causal(3, 3).to_mask(48, 32)
