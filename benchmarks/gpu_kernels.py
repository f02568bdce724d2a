"""The GPU suite's kernel sections (benchmarks/gpu_suite.py): correctness of the compiled Triton
kernels against fp32 references, and their speed against SDPA.

check_cases  per (op, head dim, dtype), B 2, Hq 8, Hkv 2 (GQA), 4096 tokens (lightning: H 8, 2048):
             s2         block_sparse_attention, S2 layout of conf/attention/s2-paper.yaml
             causal     block_sparse_attention, BlockLayout.causal (block 128 at D 128, else 64)
             infllm_v2  infllm_v2_attention end to end (token layout), conf/attention/infllm_v2-paper.yaml
                        scaled to 4K tokens (topk 8, window_size 512, dense_len 0: always sparse),
                        and its selection, impl="triton" against impl="torch"
             lightning  lightning_attention with a learned decay (the last layer's TransNormerLLM
                        schedule of a 12-layer model), chunk 64
             out, lse (softmax ops) and the gradients of sum(out * do) for q, k, v (and decay), from
             impl="triton" and impl="torch" in the case's dtype, each against the plain reference
             in fp32 (block_sparse_reference: masked SDPA; lightning_recurrent: the token loop):
                 rel = ||x - ref|| / ||ref||,   pass iff rel_triton <= max(2 rel_torch, FLOOR[dtype])
             for every tensor (FLOOR allows the tf32 dots of fp32 lightning), and for InfLLM-V2 the
             two selections differing in at most SELECT_MISMATCH of their picks.
bench_cases  per length (8K..128K, up to --max-seq-len) and method, B 1, Hq 16, Hkv 4, D 128, bf16:
             sdpa (F.scaled_dot_product_attention, causal, flash backend), s2 (s2-paper), infllm_v2
             (infllm_v2-paper with dense_len 0: selection + sparse attention), lightning (H 16, fixed
             decay); forward (no grad) and forward+backward, median of CUDA-event timings after a
             warm-up call, peak memory, the attended fraction of causal pairs and the forward's
             TFLOP/s on the attended pairs (4 D per query-key pair).

A dry run (CPU) shrinks every shape (B 1, Hq 2, Hkv 1, D 32, 64 tokens, lightning 32 in chunks of
16; bench Hq 4, Hkv 2, 128 tokens), takes the CPU-scaled settings of conf/attention/mixed.yaml,
runs Triton in the interpreter and the bench's calls once each, untimed.
"""

from __future__ import annotations

import contextlib
import statistics
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from benchmarks.gpu_suite import Settings, conf
from ltrain.attention.linear import transnormer_decay
from ltrain.kernels import (BlockLayout, block_sparse_attention, infllm_v2_attention, infllm_v2_select,
                            lightning_attention, s2_layout)
from ltrain.kernels.block_sparse_ref import block_sparse_reference
from ltrain.kernels.infllm_v2 import attended_fraction
from ltrain.kernels.lightning_ref import lightning_recurrent

FLOOR = {torch.float32: 5e-3, torch.bfloat16: 2e-2}
SELECT_MISMATCH = 0.02
BENCH_LENS = (8192, 16384, 32768, 65536, 131072)


@dataclass(frozen=True)
class Shape:
    B: int
    Hq: int
    Hkv: int
    N: int
    N_linear: int  # lightning's reference is a token loop
    chunk: int

    def text(self, D: int, block: int | None) -> str:
        return f"B{self.B} Hq{self.Hq} Hkv{self.Hkv} N{self.N} D{D}" + (f" block {block}" if block else "")


def _presets(dry_run: bool) -> tuple[dict, dict]:
    """(S2 section, InfLLM-V2 section): the paper's, or the CPU-scaled ones of conf/attention/mixed.yaml."""
    if dry_run:
        mixed = conf("attention/mixed.yaml")
        return mixed["s2"], {**mixed["infllm_v2"], "dense_len": 0}
    infllm = conf("attention/infllm_v2-paper.yaml")["infllm_v2"]
    return conf("attention/s2-paper.yaml")["s2"], {**infllm, "dense_len": 0}


def _randn(shape, dtype, gen, scale=1.0):
    return torch.randn(shape, generator=gen, device=gen.device, dtype=dtype) * scale


def _softmax_inputs(shape, D: int, dtype, dev):
    """q, do: [B, Hq, N, D]; k, v: [B, Hkv, N, D], seeded so every case sees the same inputs."""
    gen = torch.Generator(device=dev).manual_seed(0)
    q = _randn((shape.B, shape.Hq, shape.N, D), dtype, gen)
    k, v = (_randn((shape.B, shape.Hkv, shape.N, D), dtype, gen) for _ in range(2))
    return q, k, v, _randn((shape.B, shape.Hq, shape.N, D), dtype, gen)


# ---- correctness ----------------------------------------------------------------------------

def _softmax_run(fn, q, k, v, do) -> dict:
    """{out, lse (if fn returns it), dq, dk, dv} of fn(q, k, v) -> out or (out, lse); grads of sum(out * do)."""
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    res = fn(q, k, v)
    out, lse = res if isinstance(res, tuple) else (res, None)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    return {"out": out, **({"lse": lse} if lse is not None else {}), "dq": dq, "dk": dk, "dv": dv}


def _lightning_run(fn, q, k, v, decay, do) -> dict:
    q, k, v, decay = (x.detach().requires_grad_() for x in (q, k, v, decay))
    out = fn(q, k, v, decay)
    dq, dk, dv, dd = torch.autograd.grad(out, (q, k, v, decay), do)
    return {"out": out, "dq": dq, "dk": dk, "dv": dv, "d_decay": dd}


def compare(triton: dict, torch_: dict, ref: dict, dtype: torch.dtype) -> dict:
    """Per tensor: max |triton - ref|, rel errors of both paths, the allowed rel error and pass."""
    errors = {}
    for name, r in ref.items():
        r = r.detach().double()
        finite = torch.isfinite(r)
        e = {}
        for key, x in (("rel", triton[name]), ("rel_torch", torch_[name])):
            x = x.detach().double()
            same_inf = torch.equal(torch.isfinite(x), finite)  # -inf lse of empty rows in all three
            diff = (x - r)[finite]
            e[key] = (diff.norm() / r[finite].norm().clamp_min(1e-30)).item() if same_inf else float("inf")
            if key == "rel":
                e["max_abs"] = diff.abs().max().item() if same_inf else float("inf")
        e["allowed"] = max(2 * e["rel_torch"], FLOOR[dtype])
        e["pass"] = e["rel"] <= e["allowed"]  # False for NaN
        errors[name] = e
    return errors


def _block_case(layout_name: str, D: int, dtype, shape: Shape, settings: Settings, s2: dict):
    def run() -> dict:
        dev = settings.device
        q, k, v, do = _softmax_inputs(shape, D, dtype, dev)
        if layout_name == "s2":
            bs = s2["block_size"]
            layout = s2_layout(shape.Hq, shape.N, device=dev, **s2)
        else:
            bs = 16 if settings.dry_run else 128 if D == 128 else 64
            layout = BlockLayout.causal(shape.N // bs, shape.N // bs, device=dev)
        opts = dict(block_size=bs, return_lse=True)
        got = _softmax_run(lambda *x: block_sparse_attention(*x, layout, impl="triton", **opts), q, k, v, do)
        base = _softmax_run(lambda *x: block_sparse_attention(*x, layout, impl="torch", **opts), q, k, v, do)
        ref = _softmax_run(lambda *x: block_sparse_reference(*x, layout), *(x.float() for x in (q, k, v, do)))
        errors = compare(got, base, ref, dtype)
        return {"shape": shape.text(D, bs), "errors": errors,
                "status": "pass" if all(e["pass"] for e in errors.values()) else "fail"}

    return run


def _infllm_case(D: int, dtype, shape: Shape, settings: Settings, params: dict):
    def run() -> dict:
        dev = settings.device
        q, k, v, do = _softmax_inputs(shape, D, dtype, dev)
        select = {key: val for key, val in params.items() if key != "dense_len"}
        layout = infllm_v2_select(q, k, **select, impl="triton")
        picks = layout.block_mask()
        mismatch = ((picks ^ infllm_v2_select(q, k, **select, impl="torch").block_mask()).sum() / picks.sum()).item()
        bs = params["block_size"]
        got = _softmax_run(lambda *x: infllm_v2_attention(*x, **params, impl="triton")[0], q, k, v, do)
        base = _softmax_run(lambda *x: block_sparse_attention(*x, layout, block_size=bs, impl="torch"), q, k, v, do)
        ref = _softmax_run(lambda *x: block_sparse_reference(*x, layout)[0], *(x.float() for x in (q, k, v, do)))
        errors = compare(got, base, ref, dtype)
        ok = all(e["pass"] for e in errors.values()) and mismatch <= SELECT_MISMATCH
        return {"shape": shape.text(D, bs), "errors": errors, "select_mismatch": mismatch,
                "attended": attended_fraction(layout, bs), "status": "pass" if ok else "fail"}

    return run


def _lightning_case(D: int, dtype, shape: Shape, settings: Settings):
    def run() -> dict:
        dev, H, N = settings.device, shape.Hq, shape.N_linear
        gen = torch.Generator(device=dev).manual_seed(0)
        q = _randn((shape.B, H, N, D), dtype, gen, scale=D ** -0.5)
        k, v, do = (_randn((shape.B, H, N, D), dtype, gen) for _ in range(3))
        decay = transnormer_decay(H, 11, 12).to(dev)  # the mildest decays: the longest memory
        opts = dict(chunk_size=shape.chunk)
        got = _lightning_run(lambda q, k, v, d: lightning_attention(q, k, v, decay=d, impl="triton", **opts),
                             q, k, v, decay, do)
        base = _lightning_run(lambda q, k, v, d: lightning_attention(q, k, v, decay=d, impl="torch", **opts),
                              q, k, v, decay, do)
        ref = _lightning_run(lambda q, k, v, d: lightning_recurrent(q, k, v, d)[0],
                             q.float(), k.float(), v.float(), decay, do.float())
        errors = compare(got, base, ref, dtype)
        return {"shape": f"B{shape.B} H{H} N{N} D{D} chunk {shape.chunk}", "errors": errors,
                "status": "pass" if all(e["pass"] for e in errors.values()) else "fail"}

    return run


def check_cases(settings: Settings, section) -> list:
    """[(case name, run)]: most telling first (bf16 at Llama's head dim 128), so a short budget keeps them."""
    if settings.dry_run:
        section.skip("compiled Triton kernels need a GPU: the kernels ran in the interpreter (TRITON_INTERPRET=1) "
                     "at tiny shapes")
        shape, grid = Shape(1, 2, 1, 64, 32, 16), [(torch.bfloat16, 32), (torch.float32, 32)]
    else:
        n = min(4096, settings.max_seq_len)
        shape = Shape(2, 8, 2, n, min(2048, n), 64)
        grid = [(torch.bfloat16, 128), (torch.float32, 128), (torch.bfloat16, 64)]
    s2, infllm = _presets(settings.dry_run)
    if not settings.dry_run:
        infllm = {**infllm, "topk": 8, "window_size": 512}  # 16 of 64 blocks at 4K tokens: sparse, not all
    cases = []
    for dtype, D in grid:
        tag = f"D{D} {str(dtype).removeprefix('torch.')}"
        cases += [(f"s2 {tag}", _block_case("s2", D, dtype, shape, settings, s2)),
                  (f"causal {tag}", _block_case("causal", D, dtype, shape, settings, s2)),
                  (f"infllm_v2 {tag}", _infllm_case(D, dtype, shape, settings, infllm)),
                  (f"lightning {tag}", _lightning_case(D, dtype, shape, settings))]
    return cases


# ---- timings --------------------------------------------------------------------------------

def cuda_ms(fn, repeats: int) -> float:
    """Median milliseconds of fn() over `repeats` calls after a warm-up call (Triton compile,
    autotune, allocator), timed with CUDA events."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _sdpa(flash: bool):
    """Causal SDPA (enable_gqa), pinned to the flash backend when `flash`."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa(q, k, v):
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]) if flash else contextlib.nullcontext():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return sdpa


def _method(name: str, q, k, v, s2: dict, infllm: dict, impl: str):
    """(fn(q, k, v) -> out, attended fraction of causal pairs (InfLLM-V2: a dict its calls fill) or
    None, what ran)."""
    if name == "sdpa":
        flash = q.is_cuda
        if flash:
            try:  # a torch without flash GQA for these shapes: the default backend, said in the row
                with torch.no_grad():
                    _sdpa(True)(q[:, :, :128], k[:, :, :128], v[:, :, :128])
            except RuntimeError:
                flash = False
        return _sdpa(flash), 1.0, "flash" if flash else "default backend"
    if name == "s2":
        layout = s2_layout(q.shape[1], q.shape[2], device=q.device, **s2)
        fraction = layout.causal_density()
        return (lambda q, k, v: block_sparse_attention(q, k, v, layout, block_size=s2["block_size"], impl=impl)), \
            fraction, impl
    if name == "infllm_v2":
        stats = {}

        def infllm_v2(q, k, v):
            out, stats["last"] = infllm_v2_attention(q, k, v, **infllm, impl=impl)
            return out
        return infllm_v2, stats, impl
    decay = transnormer_decay(q.shape[1], 0, 12).to(q.device)
    return (lambda q, k, v: lightning_attention(q, k, v, decay=decay, chunk_size=64, impl=impl)), None, impl


def _bench_case(method: str, n: int, settings: Settings, section, s2: dict, infllm: dict):
    def run() -> dict:
        cuda = settings.device == "cuda"
        B, Hq, Hkv, D = (1, 16, 4, 128) if cuda else (1, 4, 2, 32)
        dev = settings.device
        gen = torch.Generator(device=dev).manual_seed(0)
        hkv = Hq if method == "lightning" else Hkv  # lightning keeps one state per query head
        q = _randn((B, Hq, n, D), torch.bfloat16, gen, scale=D ** -0.5 if method == "lightning" else 1.0)
        k, v = (_randn((B, hkv, n, D), torch.bfloat16, gen) for _ in range(2))
        do = _randn((B, Hq, n, D), torch.bfloat16, gen)
        fn, attended, ran = _method(method, q, k, v, s2, infllm, "triton" if cuda else "torch")
        q, k, v = (x.requires_grad_() for x in (q, k, v))

        def fwd():
            with torch.no_grad():
                fn(q, k, v)

        def fwd_bwd():
            torch.autograd.grad(fn(q, k, v), (q, k, v), do)

        row = {"method": method, "ran": ran, "seq_len": n, "shape": f"B{B} Hq{Hq} Hkv{hkv} D{D} bf16",
               "fwd_ms": None, "fwd_bwd_ms": None, "peak_gib": None, "fwd_tflops": None}
        if method == "sdpa" and not cuda:
            section.skip("SDPA's flash backend needs CUDA: the default SDPA backend stood in")
        if cuda:
            repeats = 3 if n >= 65536 else 5
            torch.cuda.reset_peak_memory_stats()
            row["fwd_ms"] = cuda_ms(fwd, repeats)
            row["fwd_bwd_ms"] = cuda_ms(fwd_bwd, repeats)
            row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        else:
            section.skip("timings: CUDA events need a GPU; each method ran forward and forward+backward once, untimed")
            section.skip("peak memory: torch.cuda memory statistics need a GPU")
            fwd()
            fwd_bwd()
        if isinstance(attended, dict):  # InfLLM-V2 reports its fraction per call
            attended = float(attended["last"]["block_fraction"])
        row["attended"] = attended
        if attended is not None and row["fwd_ms"]:
            pairs = attended * B * Hq * n * (n + 1) / 2
            row["fwd_tflops"] = 4 * D * pairs / (row["fwd_ms"] * 1e-3) / 1e12
        row["status"] = "ok"
        return row

    return run


def bench_cases(settings: Settings, section) -> list:
    """[(case name, run)] by length, then method: a short budget loses the longest lengths."""
    s2, infllm = _presets(settings.dry_run)
    if settings.dry_run:
        lens = [128]
    else:
        lens = [n for n in BENCH_LENS if n <= settings.max_seq_len] or [settings.max_seq_len]
    return [(f"{method} N{n}", _bench_case(method, n, settings, section, s2, infllm))
            for n in lens for method in ("sdpa", "s2", "infllm_v2", "lightning")]
