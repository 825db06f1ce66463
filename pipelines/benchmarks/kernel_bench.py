"""``raymoe bench kernels``: each Triton kernel against its torch path at DeepSeek-V3's shapes (CUDA only).

First the device's ceilings: a large bf16 matmul's TFLOP/s and a device-to-device copy's GB/s.
Then, per kernel and shape, the milliseconds of the Triton kernel and of the torch path, the
speedup, the achieved TFLOP/s (GEMMs) or GB/s (memory-bound kernels) as a fraction of the
ceiling, the issue's target where it sets one, and the kernel's max error against the torch
path (the bf16 paths are only checked on a GPU: Triton's CPU interpreter gets bf16 wrong).

    raymoe bench kernels                     # the table (under 3 minutes on an H200)
    raymoe bench kernels --json --out k.json # the report as JSON too (the last line of stdout)
    raymoe bench kernels --kernels mla_decode,fp8_gemm --tokens 4096

Shapes: hidden 7168, moe_intermediate 2048, 256 experts, 8 active per token, 4,096 and 16,384
tokens; MLA decode at batch 64, 4K context, 128 heads, C = 512, R = 64; FP8 GEMM x @ Wᵀ with W
18432 × 7168. Without CUDA it prints why and a JSON line with an ``error`` and exits 1.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

HIDDEN = 7168
MOE_INTERMEDIATE = 2048
N_EXPERTS = 256
TOP_K = 8
TOKENS = (4096, 16384)
MLA_BATCH, MLA_CONTEXT, MLA_HEADS, MLA_C, MLA_R, MLA_BLOCK_SIZE = 64, 4096, 128, 512, 64, 64
FP8_N, FP8_K = 18432, 7168
CEILING_MATMUL_N = 8192  # bf16 8192³: ~1.1 TFLOP a call, long enough to reach the tensor cores' rate
CEILING_COPY_BYTES = 2 * 1024**3  # 2 GiB: far past the 60 MiB L2
KERNELS = ("permute", "unpermute", "grouped_ffn", "grouped_ffn_train", "mla_decode", "fp8_gemm", "rmsnorm")
# the targets: grouped GEMM >= 60 % of the bf16 matmul rate, MLA decode >= 70 % of the copy
# bandwidth, FP8 GEMM >= 1.5x the bf16 one
TARGETS = {"grouped_ffn": ("matmul", 0.60), "mla_decode": ("copy", 0.70), "fp8_gemm": ("bf16_gemm", 1.5)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``raymoe bench kernels``."""
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object (the last line)")
    parser.add_argument("--out", type=Path, help="also write the JSON report to this file")
    parser.add_argument(
        "--kernels", type=_csv, default=KERNELS, help=f"comma list of {','.join(KERNELS)} (default all)"
    )
    parser.add_argument(
        "--tokens", type=_int_csv, default=TOKENS, help="comma list of token counts (default 4096,16384)"
    )
    parser.add_argument("--iters", type=int, default=10, help="timed calls per measurement (median; default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls first (compilation, caches; default 3)")


def _csv(text: str) -> tuple[str, ...]:
    items = tuple(item.strip() for item in text.split(",") if item.strip())
    unknown = [k for k in items if k not in KERNELS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown kernels {unknown}; choose from {','.join(KERNELS)}")
    return items


def _int_csv(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(item) for item in text.split(",") if item.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--tokens takes integers separated by commas, got {text!r}") from e
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"--tokens needs positive integers, got {text!r}")
    return values


def main(args: Any) -> int:
    """Run the benchmark; 1 (with a JSON line holding ``error``) without CUDA."""
    if not torch.cuda.is_available():
        error = "raymoe bench kernels needs a CUDA GPU and found none (torch.cuda.is_available() is False)"
        print(error, file=sys.stderr)
        _emit({"error": error, "device": None, "results": []}, args)
        return 1
    report = run(args.kernels, args.tokens, args.iters, args.warmup)
    print(format_report(report))
    _emit(report, args)
    return 0


def _emit(report: dict[str, Any], args: Any) -> None:
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    if args.json:
        print(json.dumps(report))


def time_ms(fn: Callable[[], object], *, iters: int, warmup: int) -> float:
    """Median milliseconds of ``fn()`` on the current CUDA stream (CUDA events around each call)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure_ceilings(iters: int, warmup: int) -> dict[str, float]:
    """The device's bf16 matmul TFLOP/s and device-to-device copy GB/s (read + write counted)."""
    n = CEILING_MATMUL_N
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    matmul_ms = time_ms(lambda: a @ b, iters=iters, warmup=warmup)
    src = torch.empty(CEILING_COPY_BYTES, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src), iters=iters, warmup=warmup)
    return {"matmul_tflops": 2 * n**3 / matmul_ms / 1e9, "copy_gbps": 2 * CEILING_COPY_BYTES / copy_ms / 1e6}


ERR_CHUNK = 1 << 26  # elements compared at a time: a 15 GB bf16 gradient is not copied to float32 whole


def _max_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs error relative to the reference's max magnitude, ERR_CHUNK elements at a time (comparing the
    DeepSeek-V3 experts' w13 gradients whole asked for 28 GiB more on an H200 holding 114 GiB, 2026-12-04)."""
    a, b = ours.reshape(-1), ref.reshape(-1)
    err, peak = 0.0, 0.0
    for i in range(0, a.numel(), ERR_CHUNK):
        x, y = a[i : i + ERR_CHUNK].float(), b[i : i + ERR_CHUNK].float()
        err, peak = max(err, (x - y).abs().max().item()), max(peak, y.abs().max().item())
    return err / max(peak, 1e-30)


def _routing(tokens: int) -> torch.Tensor:
    """Random top-8 of 256 experts per token (a balanced load in expectation)."""
    return torch.rand(tokens, N_EXPERTS, device="cuda").topk(TOP_K, dim=-1).indices


def _row(kernel: str, shape: str, ours_ms: float, torch_ms: float, err: float, *, flops: float = 0.0,
         bytes_moved: float = 0.0) -> dict[str, Any]:  # fmt: skip
    row = {"kernel": kernel, "shape": shape, "triton_ms": ours_ms, "torch_ms": torch_ms,
           "speedup": torch_ms / ours_ms, "max_rel_err": err}  # fmt: skip
    if flops:
        row["tflops"] = flops / ours_ms / 1e9
    if bytes_moved:
        row["gbps"] = bytes_moved / ours_ms / 1e6
    return row


def run(kernels: tuple[str, ...], tokens: tuple[int, ...], iters: int, warmup: int) -> dict[str, Any]:
    """Ceilings, then every selected kernel at every shape; returns the report."""
    torch.manual_seed(0)
    ceilings = measure_ceilings(iters, warmup)
    torch.cuda.empty_cache()
    timing = {"iters": iters, "warmup": warmup}
    results: list[dict[str, Any]] = []
    for T in tokens:
        results += _token_rows(kernels, T, timing)
        torch.cuda.empty_cache()
    if {"grouped_ffn", "grouped_ffn_train"} & set(kernels):
        results += _expert_rows(kernels, tokens, timing)
        torch.cuda.empty_cache()
    if "mla_decode" in kernels:
        results.append(_mla_row(timing))
    for row in results:
        _add_fractions(row, ceilings)
    return {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "ceilings": ceilings,
        "targets": {k: {"of": of, "at_least": v} for k, (of, v) in TARGETS.items()},
        "results": results,
    }


def _compare(kernel: str, shape: str, ours: Callable[[], Any], ref: Callable[[], Any], timing: dict[str, int],
             pick: Callable[[Any], torch.Tensor] = lambda out: out, **work: float) -> dict[str, Any]:  # fmt: skip
    """One row: both timed, the kernel's max error against the torch path (``pick`` selects the tensor)."""
    err = _max_err(pick(ours()), pick(ref()))
    return _row(kernel, shape, time_ms(ours, **timing), time_ms(ref, **timing), err, **work)


def _token_rows(kernels: tuple[str, ...], T: int, timing: dict[str, int]) -> list[dict[str, Any]]:
    """permute, unpermute, rmsnorm, fp8 GEMM and activation quantization at T tokens."""
    from raymoe.kernels import fp8, moe_permute, rmsnorm

    bf16, D = torch.bfloat16, HIDDEN
    x = torch.randn(T, D, device="cuda", dtype=bf16)
    idx = _routing(T)
    weights = torch.rand(T, TOP_K, device="cuda")
    row_bytes = D * x.element_size()
    shape = f"{T} tok × {D}, top-{TOP_K} of {N_EXPERTS}"
    rows = []
    if "permute" in kernels:
        rows.append(_compare("permute", shape, lambda: moe_permute.moe_permute(x, idx, N_EXPERTS),
                             lambda: moe_permute.moe_permute_reference(x, idx, N_EXPERTS), timing,
                             pick=lambda out: out[0], bytes_moved=2 * T * TOP_K * row_bytes))  # fmt: skip
    if "unpermute" in kernels:
        x_sorted, _, order = moe_permute.moe_permute_reference(x, idx, N_EXPERTS)
        rows.append(_compare("unpermute", shape, lambda: moe_permute.moe_unpermute(x_sorted, order, weights),
                             lambda: moe_permute.moe_unpermute_reference(x_sorted, order, weights), timing,
                             bytes_moved=(T * TOP_K + T) * row_bytes))  # fmt: skip
    if "rmsnorm" in kernels:
        norm_w = (1 + 0.01 * torch.randn(D, device="cuda")).to(bf16)
        rows.append(_compare("rmsnorm", f"{T} × {D}", lambda: rmsnorm.rms_norm(x, norm_w, 1e-6),
                             lambda: rmsnorm.rms_norm_reference(x, norm_w, 1e-6), timing,
                             bytes_moved=2 * T * row_bytes))  # fmt: skip
    if "fp8_gemm" in kernels:
        w = torch.randn(FP8_N, FP8_K, device="cuda", dtype=bf16) * FP8_K**-0.5
        w_fp8, w_scale = fp8.quantize_weight(w)
        xk = torch.randn(T, FP8_K, device="cuda", dtype=bf16)
        a_fp8, a_scale = fp8.quantize_activations(xk)
        flops = 2 * T * FP8_N * FP8_K
        # against the bf16 GEMM of the same shape (the target: 1.5x); error against the dequantized product
        row = _compare("fp8_gemm", f"{T} × {FP8_K} @ ({FP8_N} × {FP8_K})ᵀ",
                       lambda: fp8.fp8_gemm(a_fp8, a_scale, w_fp8, w_scale), lambda: xk @ w.T, timing,
                       flops=flops)  # fmt: skip
        row["torch_path"] = "bf16 matmul (error: against the dequantized fp32 product)"
        row["max_rel_err"] = _max_err(fp8.fp8_gemm(a_fp8, a_scale, w_fp8, w_scale),
                                      fp8.fp8_gemm_reference(a_fp8, a_scale, w_fp8, w_scale))  # fmt: skip
        row["bf16_tflops"] = flops / row["torch_ms"] / 1e9
        rows.append(row)
        rows.append(_compare("fp8_quantize_act", f"{T} × {FP8_K}", lambda: fp8.quantize_activations(xk),
                             lambda: fp8.quantize_activations_reference(xk), timing, pick=lambda out: out[1],
                             bytes_moved=T * FP8_K * (2 + 1)))  # fmt: skip
    return rows


def _expert_rows(kernels: tuple[str, ...], tokens: tuple[int, ...], timing: dict[str, int]) -> list[dict[str, Any]]:
    """The grouped SwiGLU FFN (forward; forward + backward) at each token count, weights shared."""
    from raymoe.kernels import grouped_ffn, moe_permute
    from raymoe.platform.model.moe import GROUPED_MM

    bf16, D, I = torch.bfloat16, HIDDEN, MOE_INTERMEDIATE
    w13 = torch.randn(N_EXPERTS, 2 * I, D, device="cuda", dtype=bf16).mul_(D**-0.5)  # 15 GB
    w2 = torch.randn(N_EXPERTS, D, I, device="cuda", dtype=bf16).mul_(I**-0.5)  # 7.5 GB
    rows = []
    for T in tokens:
        x = torch.randn(T, D, device="cuda", dtype=bf16)
        x_sorted, counts, _ = moe_permute.moe_permute_reference(x, _routing(T), N_EXPERTS)
        rows += _ffn_rows(kernels, x_sorted, counts, w13, w2, grouped_ffn, GROUPED_MM, timing)
    return rows


def _ffn_rows(kernels, x_sorted, counts, w13, w2, grouped_ffn, grouped_mm, timing):  # noqa: ANN001, ANN202
    M, D = x_sorted.shape
    I = w2.shape[2]
    flops = 6 * M * D * I  # gate+up (2·M·D·2I) and down (2·M·I·D)
    offs = counts.cumsum(0).to(torch.int32)

    def torch_ffn(xs: torch.Tensor, w13: torch.Tensor = w13, w2: torch.Tensor = w2) -> torch.Tensor:
        """The model's bf16 path: torch's grouped_mm (a loop over experts where torch lacks it)."""
        if grouped_mm is None:
            return grouped_ffn.grouped_swiglu_reference(xs, counts, w13, w2)
        gate, up = grouped_mm(xs, w13.transpose(-2, -1), offs=offs).chunk(2, dim=-1)
        return grouped_mm(torch.nn.functional.silu(gate) * up, w2.transpose(-2, -1), offs=offs)

    shape = f"{M} rows × {D}→{2 * I}→{D}, {counts.numel()} experts"
    rows = []
    if "grouped_ffn" in kernels:
        with torch.no_grad():
            rows.append(_compare("grouped_ffn", shape, lambda: grouped_ffn.grouped_swiglu(x_sorted, counts, w13, w2),
                                 lambda: torch_ffn(x_sorted), timing, flops=flops))  # fmt: skip
    if "grouped_ffn_train" in kernels:
        xg, w13g, w2g = (t.detach().requires_grad_() for t in (x_sorted, w13, w2))
        grad = torch.randn_like(x_sorted)

        def ours() -> torch.Tensor:
            xg.grad = w13g.grad = w2g.grad = None
            grouped_ffn.grouped_swiglu(xg, counts, w13g, w2g).backward(grad)
            return w13g.grad

        def ref() -> torch.Tensor:
            xg.grad = w13g.grad = w2g.grad = None
            torch_ffn(xg, w13g, w2g).backward(grad)
            return w13g.grad

        rows.append(_compare("grouped_ffn_train", shape + " fwd+bwd", ours, ref, timing, flops=3 * flops))
    return rows


def _mla_row(timing: dict[str, int]) -> dict[str, Any]:
    from raymoe.kernels import mla_decode

    B, T, H, C, R, bs = MLA_BATCH, MLA_CONTEXT, MLA_HEADS, MLA_C, MLA_R, MLA_BLOCK_SIZE
    bf16 = torch.bfloat16
    blocks = B * T // bs
    cache = torch.randn(blocks, bs, C + R, device="cuda", dtype=bf16)
    block_table = torch.randperm(blocks, device="cuda").to(torch.int32).view(B, T // bs)
    seq_lens = torch.full((B,), T, device="cuda", dtype=torch.int32)
    q_lat = torch.randn(B, H, C, device="cuda", dtype=bf16)
    q_pe = torch.randn(B, H, R, device="cuda", dtype=bf16)
    args = (q_lat, q_pe, cache, block_table, seq_lens, (128 + R) ** -0.5)
    bytes_moved = cache.numel() * cache.element_size() + 2 * q_lat.numel() * 2 + q_pe.numel() * 2
    return _compare("mla_decode", f"batch {B}, {T} ctx, {H} heads, C={C} R={R}, pages of {bs}",
                    lambda: mla_decode.mla_decode(*args), lambda: mla_decode.mla_decode_reference(*args), timing,
                    bytes_moved=bytes_moved)  # fmt: skip


def _add_fractions(row: dict[str, Any], ceilings: dict[str, float]) -> None:
    if "tflops" in row:
        row["of_matmul"] = row["tflops"] / ceilings["matmul_tflops"]
    if "gbps" in row:
        row["of_copy"] = row["gbps"] / ceilings["copy_gbps"]
    target = TARGETS.get(row["kernel"])
    if target is None:
        return
    of, at_least = target
    achieved = {"matmul": row.get("of_matmul"), "copy": row.get("of_copy"), "bf16_gemm": row.get("speedup")}[of]
    row["target"] = f">= {at_least:g} {'x the bf16 GEMM' if of == 'bf16_gemm' else 'of the ' + of + ' ceiling'}"
    row["meets_target"] = bool(achieved is not None and achieved >= at_least)


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def format_report(report: dict[str, Any]) -> str:
    """The report as a table."""
    c = report["ceilings"]
    lines = [
        f"raymoe bench kernels on {report['device']} ({report['date']}; torch {report['torch']}, "
        f"triton {report['triton']})",
        f"ceilings: bf16 matmul {c['matmul_tflops']:.0f} TFLOP/s, device copy {c['copy_gbps']:.0f} GB/s",
        f"{'kernel':<18} {'shape':<46} {'triton ms':>10} {'torch ms':>10} {'speedup':>8} {'achieved':>16} "
        f"{'of ceiling':>10}  target",
    ]
    for r in report["results"]:
        if "tflops" in r:
            achieved, frac = f"{r['tflops']:.0f} TFLOP/s", r["of_matmul"]
        else:
            achieved, frac = f"{r['gbps']:.0f} GB/s", r["of_copy"]
        target = r.get("target", "")
        if target:
            target += " ✓" if r["meets_target"] else " ✗"
        lines.append(f"{r['kernel']:<18} {r['shape']:<46} {r['triton_ms']:>10.3f} {r['torch_ms']:>10.3f} "
                     f"{r['speedup']:>7.2f}x {achieved:>16} {frac:>10.0%}  {target}")  # fmt: skip
    return "\n".join(lines)
