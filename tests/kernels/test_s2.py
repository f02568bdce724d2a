import warnings

import pytest
import torch

from ltrain.kernels import block_sparse_attention, s2_layout
from ltrain.kernels.s2 import s2_block_mask, s2_coverage, s2_pattern_coverage, s2_uncovered
from tests.kernels.test_block_sparse_cpu import NAMES, assert_close, dense_mask, make_qkv, run, sdpa_reference

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


def brute_force_uncovered(block_mask, local_blocks):
    """Causal block pairs beyond the local band that no head attends, by a plain loop over the mask [H, M, M]."""
    heads = block_mask.tolist()
    m = len(heads[0])
    return [(i, j) for i in range(m) for j in range(i + 1)
            if i - j >= local_blocks and not any(head[i][j] for head in heads)]


def distinct_patterns(num_heads, homo_head):
    return 1 if homo_head else num_heads


# vert_stride 8 (the paper's), local_blocks 16, 64 blocks: every stripe residue lies beyond the local band.
COVERAGE_CASES = [(h, homo, 0) for h in (1, 2, 4, 6, 8, 16, 32) for homo in (False, True)] + \
                 [(1, False, 1), (2, False, 1), (4, False, 1), (4, True, 1), (8, True, 1)]


@pytest.mark.parametrize("num_heads, homo_head, num_dense_heads", COVERAGE_CASES)
def test_warns_iff_some_causal_pair_is_uncovered(num_heads, homo_head, num_dense_heads):
    kw = dict(homo_head=homo_head, num_dense_heads=num_dense_heads)
    mask = s2_block_mask(num_heads, 64, **kw)
    missing = brute_force_uncovered(mask, 16)
    if missing:
        with pytest.warns(UserWarning, match="that context is dropped") as record:
            layout = s2_layout(num_heads, 64 * 64, **kw)
        msg = str(record[0].message)
        causal = 64 * 65 // 2
        assert f"no head attends {len(missing)} of {causal} causal block pairs ({len(missing) / causal:.1%})" in msg
        assert f"e.g. query block {missing[0][0]} -> key block {missing[0][1]}" in msg
        assert "vert_stride" in msg and "num_dense_heads > 0" in msg
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            layout = s2_layout(num_heads, 64 * 64, **kw)
    # The layout's own union agrees with the brute force over the full mask.
    assert brute_force_uncovered(layout.block_mask()[0], 16) == missing
    assert s2_uncovered(layout.block_mask()[0]).nonzero().tolist() == [list(p) for p in missing]


@pytest.mark.parametrize("num_heads, homo_head, num_dense_heads", COVERAGE_CASES)
def test_covered_iff_distinct_patterns_reach_vert_stride(num_heads, homo_head, num_dense_heads):
    missing = brute_force_uncovered(s2_block_mask(num_heads, 64, homo_head=homo_head,
                                                  num_dense_heads=num_dense_heads), 16)
    rule = num_dense_heads > 0 or distinct_patterns(num_heads, homo_head) >= 8
    assert (not missing) == rule
    assert s2_pattern_coverage(num_heads, homo_head=homo_head, num_dense_heads=num_dense_heads).covered == rule


@pytest.mark.parametrize("vert_stride", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("offset", [0, 1])
def test_rule_holds_for_other_strides_and_offsets(vert_stride, offset):
    for num_heads in range(1, 11):
        for homo in (False, True):
            mask = s2_block_mask(num_heads, 3 + 2 * vert_stride, local_blocks=3, vert_stride=vert_stride,
                                 homo_head=homo, head_sliding_offset=offset)
            missing = brute_force_uncovered(mask, 3)
            assert (not missing) == (distinct_patterns(num_heads, homo) >= vert_stride), (num_heads, homo)
            short = s2_pattern_coverage(num_heads, local_blocks=3, vert_stride=vert_stride, homo_head=homo,
                                        head_sliding_offset=offset)
            assert short.covered == (not missing)


def test_four_heads_stride_eight_drop_every_even_key_block():
    # The old criterion H * head_sliding_step >= vert_stride (4 * 2 = 8) called this covered.
    mask = s2_block_mask(4, 64)
    for head in range(4):  # head h keeps j = -(2h + 1) mod 8 beyond the band: odd blocks only
        assert mask[head, 63, :48].nonzero().flatten().remainder(8).unique().tolist() == [(-(2 * head + 1)) % 8]
    missing = brute_force_uncovered(mask, 16)
    assert {j % 2 for _, j in missing} == {0}
    assert {j for _, j in missing} == set(range(0, 48, 2))
    with pytest.warns(UserWarning, match=r"4 distinct head pattern\(s\).*< vert_stride=8.*num_heads >= 8"):
        s2_layout(4, 64 * 64)


def test_warning_depends_on_the_sequence_actually_built():
    # Within the local band every pair is local; the first dropped pair is (local_blocks, 0).
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s2_layout(1, 64 * 16)
        s2_layout(4, 64 * 16, homo_head=True)
    with pytest.warns(UserWarning, match=r"no head attends 1 of 153 .*query block 16 -> key block 0"):
        s2_layout(4, 64 * 17)


def test_coverage_of_a_hand_made_mask():
    mask = torch.zeros(2, 3, 3, dtype=torch.bool)
    mask[0] = torch.eye(3, dtype=torch.bool)
    mask[1, 2, 0] = True
    assert s2_uncovered(mask).nonzero().tolist() == [[1, 0], [2, 1]]
    cov = s2_coverage(mask)
    assert (cov.uncovered, cov.causal, cov.example, cov.covered) == (2, 6, (1, 0), False)
    assert cov.fraction == pytest.approx(1 / 3)
    assert s2_coverage(torch.ones(1, 3, 3, dtype=torch.bool)).covered
    with pytest.raises(ValueError, match=r"\[H, M, M\]"):
        s2_uncovered(torch.ones(3, 3, dtype=torch.bool))


def test_homo_head_and_dense_heads():
    with pytest.warns(UserWarning, match="that context is dropped"):
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
