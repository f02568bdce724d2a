import warnings

import pytest
import torch

from ltrain.kernels import block_sparse_attention, s2_layout
from tests.kernels.test_block_sparse_ref import NAMES, assert_close, dense_mask, make_qkv, run, sdpa_reference

# H=4, 8 blocks, local_blocks=2, vert_stride=4, head_sliding_offset=1 (vLLM):
# head_sliding_step = 1, head h keeps the blocks j with (j + h + 1) % 4 == 0.
PINNED = [
    ["10000000", "11000000", "01100000", "00110000", "00011000", "00011100", "00010110", "00010011"],  # j = 3, 7
    ["10000000", "11000000", "01100000", "00110000", "00111000", "00101100", "00100110", "00100011"],  # j = 2, 6
    ["10000000", "11000000", "01100000", "01110000", "01011000", "01001100", "01000110", "01000111"],  # j = 1, 5
    ["10000000", "11000000", "11100000", "10110000", "10011000", "10001100", "10001110", "10001011"],  # j = 0, 4
]


def as_rows(block_mask):
    return [["".join(str(int(x)) for x in row) for row in head] for head in block_mask.tolist()]


def test_pinned_vllm_pattern():
    layout = s2_layout(4, 8 * 64, block_size=64, local_blocks=2, vert_stride=4)
    assert layout.counts.shape == (1, 4, 8)
    assert as_rows(layout.block_mask()[0]) == PINNED


def test_head_sliding_offset_zero_shifts_heads():
    # DKernel's default offset 0: head h keeps (j + h) % 4 == 0, i.e. head 0 here is vLLM's head 3.
    layout = s2_layout(4, 8 * 16, block_size=16, local_blocks=2, vert_stride=4, head_sliding_offset=0)
    assert as_rows(layout.block_mask()[0])[0] == PINNED[3]


@pytest.mark.parametrize("num_heads", [8, 16, 32])
def test_union_over_heads_covers_causal_pairs_with_defaults(num_heads):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layout = s2_layout(num_heads, 64 * 64)
    union = layout.block_mask()[0].any(0)
    assert torch.equal(union, torch.ones(64, 64, dtype=torch.bool).tril())


@pytest.mark.parametrize("num_heads", [3, 6])
def test_warns_when_heads_do_not_cover(num_heads):
    # 3 * max(1, 8 // 3) = 6 < 8 and 6 * 1 = 6 < 8: some distant block pairs are dropped by every head.
    with pytest.warns(UserWarning, match="does not cover every causal block pair"):
        layout = s2_layout(num_heads, 64 * 32)
    uncovered = ~layout.block_mask()[0].any(0) & torch.ones(32, 32, dtype=torch.bool).tril()
    assert uncovered.any()


def test_no_warning_when_covered():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s2_layout(4, 64 * 32)                       # 4 * max(1, 8 // 4) = 8 >= 8
        s2_layout(2, 64 * 32, num_dense_heads=1)     # a dense head sees everything
        s2_layout(1, 64 * 16)                        # everything is local
    with pytest.warns(UserWarning, match="does not cover"):
        s2_layout(8, 64 * 32, homo_head=True)        # one shared pattern


def test_homo_head_and_dense_heads():
    with pytest.warns(UserWarning, match="does not cover"):
        homo = s2_layout(4, 8 * 16, block_size=16, local_blocks=2, vert_stride=4, homo_head=True)
    assert homo.counts.shape[1] == 1   # one shared pattern
    assert as_rows(homo.block_mask()[0])[0] == PINNED[0]
    dense = s2_layout(4, 8 * 16, block_size=16, local_blocks=2, vert_stride=4, num_dense_heads=1)
    rows = as_rows(dense.block_mask()[0])
    assert rows[:3] == PINNED[:3]
    assert torch.equal(dense.block_mask()[0, 3], torch.ones(8, 8, dtype=torch.bool).tril())


def test_density_matches_rule_and_report():
    report = {}
    for seq_len in (4096, 16384, 65536):
        layout = s2_layout(8, seq_len)
        M = seq_len // 64
        want = sum(1 for i in range(M) for j in range(i + 1) if i - j < 16 or (j + 1) % 8 == 0)  # head 0
        assert int(layout.counts[0, 0].sum()) == want
        report[seq_len] = (layout.density(), layout.density() / ((M + 1) / (2 * M)))
    print("\nS2 density (all blocks, vs dense causal):",
          {n: f"{d:.3f} ({r:.3f} of causal)" for n, (d, r) in report.items()})
    assert report[4096][1] > report[16384][1] > report[65536][1]


def test_bad_seq_len():
    with pytest.raises(ValueError, match="pad the sequence"):
        s2_layout(4, 100)


def test_s2_attention_matches_sdpa():
    layout = s2_layout(4, 128, block_size=16, local_blocks=2, vert_stride=4)
    q, k, v, do, dlse = make_qkv(1, 4, 2, 128, 128, 32)
    mask = dense_mask(layout, 1, 4, 128, 128)
    got = run(lambda q, k, v: block_sparse_attention(q, k, v, layout, block_size=16, return_lse=True), q, k, v, do, dlse)
    assert_close(got, run(lambda q, k, v: sdpa_reference(q, k, v, mask), q, k, v, do, dlse), NAMES)
