"""Decode GEMV bandwidth: cuBLAS against the Triton GEMV of telechat.model.kernels (CUDA only).

For every projection of a released shape (default the 7B: fused qkv 4096→12288, gate_up
4096→24576, dense 4096→4096, down 12288→4096, lm_head 4096→160256) and M rows in 1, 2, 4, 8:
achieved GB/s (weight + input + output bytes per call) and its share of the copy bandwidth measured
in the same run (device-to-device copy of 1 GiB, bytes read + written), for cuBLAS (``F.linear``)
and every Triton tiling of ``GEMV_CANDIDATES``, each timed two ways: replayed from a CUDA graph (as
decode steps run, and as ``tune_gemv`` decides; the headline figures) and launched eagerly. The
table shows cuBLAS, the best candidate, the best of the tilings the engine tunes (``GEMV_CONFIGS``)
and the engine's choice (Triton only when ``GEMV_MIN_GAIN`` faster). Each call reads another copy of
the weight, enough copies to exceed four times the L2 cache, so weights come from HBM as in a
forward; each result is checked against cuBLAS after the timed replays. Prints one JSON line per
measurement (``--all-configs``: one per tiling too) and a table; ``--json PATH`` also writes them
(after each shape).

With ``--fp8`` the weights are E4M3 with per-output-channel scales (what ``telechat quantize --method fp8``
writes): the baseline is then the FP8 Linear's own path (per-token activation quantization + row-wise
``torch._scaled_mm``) and the Triton tilings read one byte per weight (weight-only dequantization); the
head stays bf16 as the quant job leaves it, so it is not measured. Every FMA tiling is also measured with its
one-row loop pipelined through shared memory (``pipelined=True``); the table's "FMA regs / smem" column holds the
best of each.

    python bench/gemv.py --all-configs --json bench/results/h200-gemv.json
    python bench/gemv.py --preset 12B --m 1,8
    python bench/gemv.py --fp8 --m 1,16,64 --all-configs
    python bench/gemv.py --fp8 --m 1,4,16 --tuned-only --kinds fma,dot8   # the engine's tilings only
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import write_json  # noqa: E402
from telechat.model.config import PRESETS, preset  # noqa: E402
from telechat.model.fp8 import Fp8Linear  # noqa: E402
from telechat.model.kernels import GEMV_CANDIDATES, GEMV_CONFIGS, GEMV_KINDS, GEMV_MAX_M, GEMV_MIN_GAIN, gemv, time_per_call  # noqa: E402


def shapes(name: str) -> dict[str, tuple[int, int, bool]]:
    """Projection name → (N outputs, K inputs, has bias) of a released shape, projections fused as served."""
    c = preset(name)
    h, q, kv = c.hidden_size, c.n_head * c.head_dim, c.num_key_value_heads * c.head_dim
    return {"qkv": (q + 2 * kv, h, False), "gate_up": (2 * c.ffn_hidden_size, h, False), "dense": (h, q, True),
            "down": (h, c.ffn_hidden_size, True), "lm_head": (c.vocab_size, h, False)}


class Weight:
    """One copy of a random ``[n, k]`` projection (std 0.02; FP8: quantized per output channel): the
    baseline module (``nn.Linear`` or :class:`Fp8Linear`), its reference and its GEMV call."""

    def __init__(self, n: int, k: int, bias: torch.Tensor | None, dtype: torch.dtype, fp8: bool):
        linear = torch.nn.Linear(k, n, bias=bias is not None, device="cuda", dtype=dtype)
        torch.nn.init.normal_(linear.weight, std=0.02)
        if bias is not None:
            linear.bias.copy_(bias)
        self.module = Fp8Linear.from_linear(linear) if fp8 else linear
        self.scale = self.module.weight_scale if fp8 else None

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """What the GEMV computes, by cuBLAS: ``x`` times the (FP8: dequantized) weight, plus the bias."""
        w = self.module.weight
        if self.scale is not None:
            w = (w.float() * self.scale).to(x.dtype)
        return F.linear(x, w, self.module.bias)

    def gemv(self, x: torch.Tensor, config) -> torch.Tensor:
        return gemv(x, self.module.weight, self.module.bias, config, self.scale, getattr(self.module, "input_scale", None))


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + written), median of 20 copies of 1 GiB."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / time_per_call(lambda: dst.copy_(src), 1, reps=20)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="7B", choices=list(PRESETS))
    p.add_argument("--m", default="1,2,4,8", help=f"rows of x (comma-separated, each ≤ {GEMV_MAX_M})")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--fp8", action="store_true", help="E4M3 weights with per-channel scales (baseline: _scaled_mm)")
    p.add_argument("--kinds", default=",".join(GEMV_KINDS), help="only the tilings of these kinds (comma-separated)")
    p.add_argument("--all-configs", action="store_true", help="also print every Triton tiling's figure")
    p.add_argument("--tuned-only", action="store_true",
                   help="only the tilings the engine tunes (GEMV_CONFIGS), not every candidate")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the results here")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/gemv.py measures CUDA kernels; no CUDA GPU is visible")
    dtype = getattr(torch, args.dtype)
    ms = [int(m) for m in args.m.split(",")]
    kinds = args.kinds.split(",")
    if not all(0 < m <= GEMV_MAX_M for m in ms):
        sys.exit(f"--m: each row count must be 1 to {GEMV_MAX_M}")
    copy_bw = copy_bandwidth()
    # every FMA tiling also with its one-row loop pipelined through shared memory (same run, same shapes)
    candidates = GEMV_CONFIGS if args.tuned_only else \
        tuple(dict.fromkeys(GEMV_CANDIDATES + tuple(dataclasses.replace(c, pipelined=True)
                                                    for c in GEMV_CANDIDATES if c.kind == "fma")))
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    rows = [{"measure": "copy_bandwidth", "gb_s": round(copy_bw / 1e9, 1)}]
    print(json.dumps(rows[0]), flush=True)
    torch.manual_seed(0)
    with torch.inference_mode():
        for name, (n, k, has_bias) in shapes(args.preset).items():
            if args.fp8 and name == "lm_head":
                continue
            weight_bytes = n * k * (1 if args.fp8 else dtype.itemsize)
            copies = max(2, math.ceil(4 * l2 / weight_bytes))
            bias = torch.randn(n, dtype=dtype, device="cuda") if has_bias else None
            weights = [Weight(n, k, bias, dtype, args.fp8) for _ in range(copies)]
            for m in ms:
                x = torch.randn(m, k, dtype=dtype, device="cuda")
                nbytes = weight_bytes + (m * k + m * n + (n if has_bias else 0)) * dtype.itemsize
                ref = weights[0].reference(x).float()
                ref_x_fp8 = weights[0].module(x).float()  # FP8 tensor-core tilings quantize x as the module does

                def rate(fn, graph: bool, weights=weights) -> float:
                    """Bytes/s of ``fn(weight)`` calls, each on the next copy of the weight."""
                    return nbytes / time_per_call(lambda: [fn(w) for w in weights], copies, graph=graph)

                cublas = rate(lambda w: w.module(x), True)
                cublas_eager = rate(lambda w: w.module(x), False)
                measured = []  # (config, graph bytes/s, eager bytes/s) of the correct tilings
                for config in candidates:
                    if m > config.max_m or config.kind not in kinds or (config.kind == "dot8" and not args.fp8):
                        continue
                    want = ref_x_fp8 if config.kind == "dot8" else ref
                    try:
                        r = rate(lambda w: w.gemv(x, config), True)
                        r_eager = rate(lambda w: w.gemv(x, config), False)
                        err = (weights[0].gemv(x, config).float() - want).abs().max().item()
                    except Exception as e:  # noqa: BLE001 - one tiling out of resources must not end the run
                        rows.append({"measure": "gemv_config", "shape": name, "m": m, "config": str(config),
                                     "error": f"{type(e).__name__}: {e}"[:300]})
                        print(json.dumps(rows[-1]), flush=True)
                        continue
                    ok = err <= 2e-2 * want.abs().max().item()
                    if args.all_configs:
                        rows.append({"measure": "gemv_config", "shape": name, "m": m, "config": str(config),
                                     "gb_s": round(r / 1e9, 1), "pct_copy": round(100 * r / copy_bw, 1),
                                     "eager_pct_copy": round(100 * r_eager / copy_bw, 1),
                                     "max_abs_err": err, "correct": ok})
                        print(json.dumps(rows[-1]), flush=True)
                    if ok:
                        measured.append((config, r, r_eager))
                best = max(measured, key=lambda c: c[1], default=(None, 0.0, 0.0))
                fma = {p: max((c[1] for c in measured if c[0].kind == "fma" and c[0].pipelined == p), default=0.0)
                       for p in (False, True)}
                tuned = max((c for c in measured if c[0] in GEMV_CONFIGS), key=lambda c: c[1],
                            default=(None, 0.0, 0.0))
                row = {"measure": "gemv", "shape": name, "n": n, "k": k, "m": m,
                       "cublas_gb_s": round(cublas / 1e9, 1), "cublas_pct_copy": round(100 * cublas / copy_bw, 1),
                       "cublas_eager_pct_copy": round(100 * cublas_eager / copy_bw, 1),
                       "triton_gb_s": round(best[1] / 1e9, 1), "triton_pct_copy": round(100 * best[1] / copy_bw, 1),
                       "triton_eager_pct_copy": round(100 * best[2] / copy_bw, 1), "triton_config": str(best[0]),
                       "tuned_pct_copy": round(100 * tuned[1] / copy_bw, 1), "tuned_config": str(tuned[0]),
                       "engine_uses": "triton" if tuned[1] * (1 - GEMV_MIN_GAIN) > cublas else "cublas",
                       "fma_plain_pct_copy": round(100 * fma[False] / copy_bw, 1),
                       "fma_pipelined_pct_copy": round(100 * fma[True] / copy_bw, 1)}
                rows.append(row)
                print(json.dumps(row), flush=True)
            weights = None  # free this shape's copies before the next
            torch.cuda.empty_cache()
            if args.json:  # after each shape, so a run cut short keeps what it measured
                write_json(args.json, rows, preset=args.preset, dtype=args.dtype, fp8_weights=args.fp8)
    baseline = "_scaled_mm" if args.fp8 else "cuBLAS"
    print(f"\n{args.preset} {'FP8 weights, ' if args.fp8 else ''}{args.dtype}, copy bandwidth {copy_bw / 1e9:.0f} GB/s; % of copy, CUDA graph (eager)")
    print(f"{'shape':8} {'N':>7} {'K':>6} {'M':>2}  {baseline:>13}  {'best Triton':>13}  {'tuned set':>9}  engine  "
          "FMA regs / smem  best tiling")
    for r in (r for r in rows if r["measure"] == "gemv"):
        print(f"{r['shape']:8} {r['n']:7} {r['k']:6} {r['m']:2}  {r['cublas_pct_copy']:5.1f} "
              f"({r['cublas_eager_pct_copy']:5.1f})  {r['triton_pct_copy']:5.1f} ({r['triton_eager_pct_copy']:5.1f})  "
              f"{r['tuned_pct_copy']:9.1f}  "
              f"{r['engine_uses']:6}  {r['fma_plain_pct_copy']:5.1f} / {r['fma_pipelined_pct_copy']:5.1f}  {r['triton_config']}")


if __name__ == "__main__":
    main()
