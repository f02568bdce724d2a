"""kernels/aot.py: the GPU arch rule, the preset launches it names (checked against conf/), and
the launch configurations the softmax kernels derive for every setting ltrain allows. The
compiled resources themselves are checked by tests/benchmarks/test_triton_resources.py."""

import itertools
from pathlib import Path

import pytest
import torch
import triton
import yaml

from ltrain.config import CHOICES
from ltrain.kernels import aot
from ltrain.kernels import block_sparse_triton as bst
from ltrain.kernels import infllm_v2_triton
from ltrain.kernels import token_sparse_triton as tst
from ltrain.kernels.block_sparse import BLOCK_SIZES, DTYPES

CONF = Path(__file__).resolve().parents[2] / "conf"


@pytest.mark.parametrize("capability,arch", [((8, 0), 80), ((8, 6), 80), ((8, 9), 80), ((9, 0), 90), ((10, 0), 90)])
def test_target_arch_of_supported_gpus(capability, arch):
    assert aot.target_arch(capability) == arch


@pytest.mark.parametrize("capability", [(7, 5), (7, 0), (6, 1)])
def test_gpus_older_than_sm80_get_one_clear_error(capability):
    with pytest.raises(ValueError, match=rf"sm_{capability[0]}{capability[1]} is older than sm_80.*impl='torch'"):
        aot.target_arch(capability)


def _yaml(path):
    return yaml.safe_load(path.read_text())


def test_presets_are_those_of_conf():
    models = [_yaml(p) for p in sorted((CONF / "model").glob("*.yaml"))]
    assert set(aot.PRESET_MODELS) == {(m["dim"] // m["n_heads"], m["n_heads"] // m["n_kv_heads"]) for m in models}
    attention = [_yaml(p) for p in sorted((CONF / "attention").glob("*.yaml"))]
    block_sizes = {a[kind]["block_size"] for a in attention for kind in ("s2", "infllm_v2") if kind in a}
    # Dense layers under context parallelism tile the ring with blocks of at most 64 (parallel.sharding.dense_block_size).
    assert set(aot.PRESET_BLOCK_SIZES) == block_sizes | {64}
    assert set(aot.PRESET_DTYPES) == {dict(fp32=torch.float32, bf16=torch.bfloat16)[p]
                                      for p in CHOICES["trainer.precision"]}
    geometries = {(a["infllm_v2"]["kernel_size"], a["infllm_v2"]["kernel_stride"], a["infllm_v2"]["block_size"],
                   a["infllm_v2"]["lse"]) for a in attention if "infllm_v2" in a}
    assert set(infllm_v2_triton.PRESET_GEOMETRIES) == geometries


def _pow2(n):
    return n >= 16 and n & (n - 1) == 0


@pytest.mark.parametrize("arch", aot.ARCHS)
def test_every_allowed_setting_has_a_launch_config(arch):
    """Own tiles serve one layout row (they divide the block); looped tiles are powers of two."""
    for dtype, d, bs in itertools.product(DTYPES, bst.HEAD_DIMS, BLOCK_SIZES):
        for kernel in bst.KERNELS:
            cfg = bst.launch_config(kernel, arch=arch, dtype=dtype, head_dim=d, block_size=bs)
            own, looped = ("BLOCK_N", "BLOCK_M") if kernel == "dkdv" else ("BLOCK_M", "BLOCK_N")
            assert bs % cfg[own] == 0 and _pow2(cfg[own]) and _pow2(cfg[looped]), (kernel, dtype, d, bs, cfg)
            assert cfg["num_warps"] in (4, 8) and cfg["num_stages"] in (1, 2, 3)
            for g in (1, 3, 4, 40, 128):
                tok = tst.launch_config(kernel, arch=arch, dtype=dtype, head_dim=d, block_size=bs, group=g)
                if kernel == "dkdv":
                    assert bs % tok["BLOCK_N"] == 0 and _pow2(tok["BLOCK_M"]), (dtype, d, bs, g, tok)
                else:
                    assert tok["BLOCK_M"] == min(tst.MAX_BLOCK_H, max(16, triton.next_power_of_2(g)))


def test_head_dim_without_a_launch_config_is_one_clear_error():
    with pytest.raises(ValueError, match=r"head dim 48 has no Triton launch configuration.*impl='torch'"):
        bst.launch_config("fwd", arch=90, dtype=torch.bfloat16, head_dim=48, block_size=64)


def test_tiles_are_decoupled_from_the_block():
    # Block 64 at head dim 128 on sm_80: 32-key dq tiles inside a block, 32-query dk/dv tiles.
    assert bst.launch_config("dq", arch=80, dtype=torch.bfloat16, head_dim=128, block_size=64)["BLOCK_N"] == 32
    assert bst.launch_config("dkdv", arch=80, dtype=torch.bfloat16, head_dim=128, block_size=64)["BLOCK_M"] == 32
    # Block 16: the looped tile gathers several listed blocks; the own tile shrinks to the block with 4 warps.
    cfg = bst.launch_config("fwd", arch=90, dtype=torch.bfloat16, head_dim=64, block_size=16)
    assert (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["num_warps"]) == (16, 64, 4)


def test_compile_spec_rejects_unknown_arch_and_interpreted_kernels():
    spec = bst.aot_spec("fwd", arch=90, dtype=torch.bfloat16, head_dim=64, block_size=64, causal=True, default=True)
    with pytest.raises(ValueError, match="arch=75"):
        aot.compile_spec(spec, 75)
    if not isinstance(spec.fn, triton.runtime.jit.JITFunction):
        with pytest.raises(ValueError, match="without TRITON_INTERPRET=1"):
            aot.compile_spec(spec, 90)


def test_specs_of_each_module_are_distinct_and_flag_the_presets():
    for module in (bst, tst, infllm_v2_triton):
        specs = module.aot_specs()
        keys = [(s.kernel, tuple(sorted(s.config.items()))) for s in specs]
        assert len(set(keys)) == len(keys), module.__name__
        assert any(s.default for s in specs) and not all(s.default for s in specs)
        for s in specs:
            assert set(s.constexprs) <= set(s.signature) and set(s.aligned) <= set(s.signature)
            assert all(s.signature[name] == "constexpr" for name in s.constexprs)
