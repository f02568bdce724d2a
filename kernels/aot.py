"""The GPU targets ltrain's Triton kernels are built for, and their
ahead-of-time compilation (no GPU needed).

Every kernels/*_triton.py module exposes `aot_specs() -> list[AOTSpec]`, built
from the same launch-parameter function its launcher calls, so that
`compile_spec(spec, arch)` compiles exactly what ltrain would launch on that
arch and reads its registers, spilled bytes and shared memory from the cubin
(benchmarks/triton_resources.py reports them; tests/benchmarks checks them).

A spec whose config names an `arch` (a launch choice that depends on it) is
compiled for that arch only; any other for every arch in ARCHS.

Targets: sm_80 (A100) and sm_90 (H100/H200). SHARED_LIMITS are the opt-in
shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin): a launch
asking for more fails with Triton's OutOfResources.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import triton
import triton.backends.compiler
import triton.compiler

ARCHS = (80, 90)
SHARED_LIMITS = {80: 163 * 1024, 90: 227 * 1024}

# What ltrain's shipped presets launch (tests/kernels/test_aot.py derives the same from conf/):
# head dims dim / n_heads and GQA groups n_heads / n_kv_heads of conf/model/*.yaml (nano 32 / 1,
# tiny 32 / 2, small 64 / 3, llama-1b 64 / 4); block sizes of conf/attention/*.yaml (CPU-scaled 16, paper 64;
# dense layers' ring tiles are 64); trainer.precision fp32 or bf16; every ltrain layer is causal.
PRESET_MODELS = ((32, 1), (32, 2), (64, 3), (64, 4))
PRESET_BLOCK_SIZES = (16, 64)
PRESET_DTYPES = (torch.bfloat16, torch.float32)


def target_arch(capability: tuple[int, int]) -> int:
    """Launch-config arch of a GPU of compute capability (major, minor):
    90 for Hopper and newer, 80 for Ampere / Ada. ValueError for older GPUs,
    whose shared memory and instructions the kernels were not built for."""
    major, minor = capability
    if major < 8:
        raise ValueError(f"GPU compute capability sm_{major}{minor} is older than sm_80: ltrain's Triton kernels "
                         "need an A100/H100-class GPU (sm_80+); use impl='torch' on this GPU")
    return 90 if major >= 9 else 80


def device_arch(device) -> int:
    """target_arch of a CUDA device (torch.cuda.get_device_capability)."""
    return target_arch(torch.cuda.get_device_capability(device))


@dataclass(frozen=True)
class AOTSpec:
    """One kernel launch as ltrain makes it. signature: arg name -> Triton type
    ("*bf16", "*fp32", "i32", "fp32", "constexpr"); constexprs: name -> value;
    config: what a reader needs (dtype, head_dim, tiles, causal, ...); default:
    a configuration ltrain's shipped presets launch. aligned: int args that
    real launches pass as multiples of 16 (strides of contiguous tensors),
    which Triton's runtime specialises on; pointers are always 16-byte aligned."""
    kernel: str
    fn: object
    signature: dict
    constexprs: dict
    num_warps: int
    num_stages: int
    config: dict
    default: bool
    aligned: tuple = field(default=())


def signature(fn, constexprs: dict, pointers: dict, floats: tuple = ()) -> dict:
    """Triton signature of fn: the args in `pointers` -> "*<type>", `floats` -> "fp32",
    constexprs -> "constexpr", every other arg "i32" (indices, sizes, strides)."""
    def kind(name):
        if name in constexprs:
            return "constexpr"
        if name in pointers:
            return "*" + pointers[name]
        return "fp32" if name in floats else "i32"
    return {name: kind(name) for name in fn.arg_names}


def _attrs(spec: AOTSpec) -> dict:
    names = list(spec.signature)
    return {(names.index(n),): [["tt.divisibility", 16]] for n, t in spec.signature.items()
            if t.startswith("*") or n in spec.aligned}


def _cuobjdump() -> str:
    return triton.knobs.nvidia.cuobjdump.path


def resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, spilled bytes per thread: STACK) of a one-kernel cubin, from cuobjdump -res-usage."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        text = subprocess.run([_cuobjdump(), "-res-usage", str(path)], capture_output=True, text=True,
                              check=True).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+)", text)
    if match is None:
        raise RuntimeError(f"cuobjdump -res-usage printed no REG/STACK line:\n{text}")
    return int(match.group(1)), int(match.group(2))


def compile_spec(spec: AOTSpec, arch: int) -> dict:
    """Compile spec for sm_<arch> (80 or 90) ->
    {registers, spill_bytes, shared_bytes (dynamic shared memory the launch requests), compile_s}."""
    if arch not in ARCHS:
        raise ValueError(f"arch={arch}: ltrain's kernels target {ARCHS}")
    if not isinstance(spec.fn, triton.runtime.jit.JITFunction):
        raise ValueError(f"{spec.kernel}: {type(spec.fn).__name__} is not a compiled-mode Triton kernel; import the "
                         "kernels without TRITON_INTERPRET=1 to compile them ahead of time")
    src = triton.compiler.ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs,
                                    attrs=_attrs(spec))
    start = time.perf_counter()
    kernel = triton.compile(src, target=triton.backends.compiler.GPUTarget("cuda", arch, 32),
                            options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    compile_s = time.perf_counter() - start
    registers, spill = resource_usage(kernel.asm["cubin"])
    return dict(registers=registers, spill_bytes=spill, shared_bytes=int(kernel.metadata.shared),
                compile_s=round(compile_s, 3))
