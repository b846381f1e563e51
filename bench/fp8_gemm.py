"""FP8 vs bf16 GEMMs at TeleChat-7B shapes (issue 20): is the FP8 path worth it at decode and prefill sizes?

For each Linear of a 7B block (and the fused qkv / gate_up that serving builds for dense Linears),
and each token count M, times in the same process:

- ``bf16``: ``F.linear`` on bf16 weights (the baseline);
- ``fp8``: :class:`telechat.model.fp8.Fp8Linear` as served (per-token activation quantization +
  row-wise ``torch._scaled_mm``);
- ``fp8_gemm``: the ``torch._scaled_mm`` call alone on pre-quantized activations (what a fused
  quantization kernel could reach).

Each measure replays a CUDA graph of ``--reps`` calls (as the engine's decode steps do), so launch
overhead does not hide the kernels; ``--eager`` times plain calls instead. Prints one JSON line per
measurement, then a table (microseconds per call, weight GB/s, TFLOP/s, speedup over bf16).

    python bench/fp8_gemm.py                  # M = 1 and 64
    python bench/fp8_gemm.py --m 1,16,64,256,2048
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from telechat.model.fp8 import Fp8Linear, check_fp8_device, quantize_activation  # noqa: E402

HIDDEN, FFN = 4096, 12288
SHAPES = {  # name: (in_features K, out_features N), TeleChat-7B
    "query": (HIDDEN, HIDDEN),
    "key_value": (HIDDEN, 2 * HIDDEN),
    "qkv (fused)": (HIDDEN, 3 * HIDDEN),
    "dense": (HIDDEN, HIDDEN),
    "gate_proj / up_proj": (HIDDEN, FFN),
    "gate_up (fused)": (HIDDEN, 2 * FFN),
    "down_proj": (FFN, HIDDEN),
}


def time_us(fn, reps: int, eager: bool) -> float:
    """Microseconds per call of ``fn``: replay of a CUDA graph of ``reps`` calls, or ``reps`` eager calls."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    if eager:
        start.record()
        for _ in range(reps):
            fn()
        end.record()
    else:
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
            for _ in range(reps):
                fn()
        graph.replay()
        torch.cuda.synchronize()
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / reps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--m", default="1,64", help="token counts (default: 1,64: decode and a 64-sequence batch)")
    p.add_argument("--reps", type=int, default=50, help="calls per measurement (default: 50)")
    p.add_argument("--eager", action="store_true", help="time eager calls instead of CUDA graph replays")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/fp8_gemm.py needs a CUDA GPU of compute capability 8.9+")
    check_fp8_device("cuda")
    print(json.dumps({"measure": "setup", "card": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "graphs": not args.eager}), flush=True)
    rows = []
    torch.manual_seed(0)
    with torch.inference_mode():
        for name, (k, n) in SHAPES.items():
            dense = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
            fp8 = Fp8Linear.from_linear(dense)
            for m in [int(v) for v in args.m.split(",") if v]:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                xq, xs = quantize_activation(x)
                w_t, ws_t = fp8.weight.t(), fp8.weight_scale.t()
                bf16_us = time_us(lambda: F.linear(x, dense.weight), args.reps, args.eager)
                fp8_us = time_us(lambda: fp8(x), args.reps, args.eager)
                gemm_us = time_us(lambda: torch._scaled_mm(xq, w_t, scale_a=xs, scale_b=ws_t,
                                                           out_dtype=torch.bfloat16), args.reps, args.eager)
                for path, us, weight_bytes in (("bf16", bf16_us, 2 * k * n), ("fp8", fp8_us, k * n),
                                               ("fp8_gemm", gemm_us, k * n)):
                    row = {"measure": "gemm", "linear": name, "K": k, "N": n, "M": m, "path": path,
                           "us": round(us, 2), "weight_GB_s": round(weight_bytes / us / 1e3, 1),
                           "TFLOP_s": round(2 * m * k * n / us / 1e6, 2), "speedup_vs_bf16": round(bf16_us / us, 2)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    print("\n| linear | K×N | M | bf16 µs | fp8 µs | fp8 GEMM only µs | fp8 speedup | fp8 weight GB/s |")
    print("|---|---|---|---|---|---|---|---|")
    by_key = {(r["linear"], r["M"], r["path"]): r for r in rows}
    for name, (k, n) in SHAPES.items():
        for m in sorted({r["M"] for r in rows}):
            b, f, g = (by_key[(name, m, path)] for path in ("bf16", "fp8", "fp8_gemm"))
            print(f"| {name} | {k}×{n} | {m} | {b['us']} | {f['us']} | {g['us']} | {f['speedup_vs_bf16']}× | "
                  f"{f['weight_GB_s']} |")


if __name__ == "__main__":
    main()
