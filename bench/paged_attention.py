"""Sweep the paged decode-attention kernel's launch shape on this card (CUDA).

    python bench/paged_attention.py --json bench/results/h200-paged-attention.json

For each case (sequences x context length, TeleChat-7B heads: 32 x 128, 16-token blocks, bf16 and FP8
caches) every :class:`~telechat.engine.paged_attention.DecodeKernelConfig` of the grid is timed in a
CUDA graph (as decode runs) and checked against the default's output. Reported per case: the
default's time and its share of copy bandwidth (K + V bytes read), the fastest config; then the
config with the best geometric-mean slowdown over all cases, and over the small (<= 8 sequences) and
large (>= 16) cases apart.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine import copy_bandwidth  # noqa: E402
from bench.report import write_json  # noqa: E402
from telechat.engine.paged_attention import DEFAULT_CONFIG, DecodeKernelConfig, paged_decode_attention  # noqa: E402
from telechat.model.kernels import FP8_DTYPE, time_per_call  # noqa: E402

CASES = [(1, 160), (1, 4096), (1, 32768), (8, 2048), (16, 1024), (64, 256), (64, 512), (64, 2048), (256, 256)]
HEADS, HEAD_DIM, BLOCK = 32, 128, 16


CALLS = 20
"""Kernel launches per captured graph."""


def time_us(fn) -> float:
    """Microseconds per call of ``fn``, replayed from a CUDA graph of :data:`CALLS` calls (as decode runs)."""
    return time_per_call(lambda: [fn() for _ in range(CALLS)], CALLS, graph=True) * 1e6


def case_data(rows: int, ctx: int, fp8: bool):
    """Random q, a shuffled paged cache holding ``rows`` sequences of ``ctx`` tokens, tables and lengths."""
    blocks_per = math.ceil(ctx / BLOCK)
    blocks = rows * blocks_per + 1
    kc = torch.randn(blocks * BLOCK, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    if fp8:
        kc, vc = kc.to(FP8_DTYPE), vc.to(FP8_DTYPE)
    table = (torch.randperm(blocks - 1, device="cuda")[: rows * blocks_per] + 1).view(rows, -1).int()
    lens = torch.full((rows,), ctx, device="cuda", dtype=torch.int32)
    q = torch.randn(rows, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    return q, kc, vc, table, lens


def grid() -> list[DecodeKernelConfig]:
    return [DecodeKernelConfig(tokens=t, num_warps=w, num_stages=s, target_programs=p, early_v=e)
            for t, w, s, p, e in itertools.product((16, 32, 64), (2, 4, 8), (1, 2, 3), (2048, 4096, 8192),
                                                   (False, True))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("paged_attention: needs a CUDA GPU")
    bw = copy_bandwidth(torch.device("cuda"))
    configs = grid()
    rows_out, table = [], {}
    for fp8 in (False, True):
        for rows, ctx in CASES:
            q, kc, vc, tables, lens = case_data(rows, ctx, fp8)
            ref = paged_decode_attention(q, kc, vc, tables, lens, BLOCK).float()
            times = {}
            for c in configs:
                out = paged_decode_attention(q, kc, vc, tables, lens, BLOCK, config=c).float()
                if (out - ref).norm() > 1e-2 * ref.norm():
                    raise SystemExit(f"paged_attention: {c} disagrees with the default on {rows} x {ctx}")
                times[c] = time_us(lambda c=c: paged_decode_attention(q, kc, vc, tables, lens, BLOCK, config=c))
            read = rows * ctx * HEADS * HEAD_DIM * 2 * kc.element_size()
            best = min(times, key=times.get)
            row = dict(cache="fp8" if fp8 else "bf16", rows=rows, context=ctx, default_us=round(times[DEFAULT_CONFIG], 2),
                       default_bw_share=round(read / (times[DEFAULT_CONFIG] * 1e-6) / bw, 3),
                       best_us=round(times[best], 2), best_bw_share=round(read / (times[best] * 1e-6) / bw, 3),
                       best=vars(best))
            print(json.dumps(row), flush=True)
            rows_out.append(row)
            table[(fp8, rows, ctx)] = times

    def best_overall(keys) -> tuple[DecodeKernelConfig, float]:
        score = {c: math.exp(sum(math.log(table[k][c] / min(table[k].values())) for k in keys) / len(keys))
                 for c in configs}
        c = min(score, key=score.get)
        return c, score[c]

    summary = {}
    for name, keys in [("all", list(table)), ("small", [k for k in table if k[1] <= 8]),
                       ("large", [k for k in table if k[1] >= 16])]:
        c, slowdown = best_overall(keys)
        default = math.exp(sum(math.log(table[k][DEFAULT_CONFIG] / min(table[k].values())) for k in keys) / len(keys))
        summary[name] = dict(best=vars(c), best_geomean_slowdown=round(slowdown, 3),
                             default_geomean_slowdown=round(default, 3))
        print(f"{name}: best {c} ({slowdown:.3f}x of per-case best), default {default:.3f}x", flush=True)
    if args.json:
        write_json(args.json, rows_out, copy_bandwidth_tbs=round(bw / 1e12, 2), summary=summary,
                   default=vars(DEFAULT_CONFIG))


if __name__ == "__main__":
    main()
