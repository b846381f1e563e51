"""Time the prefix-prefill attention kernel alone (CUDA): chunks continuing cached context, each context read
by one program against split into partitions merged afterwards, in one process (bench/RESULTS.md).

    python bench/prefix_kernel.py --chunks 1,2,4,8,16 --new-len 48 --context 4433 --targets 1,256,1024

Each case: ``--chunks`` chunks of ``--new-len`` tokens over ``--context`` cached positions in random slots, the
7B's heads (32 × 128, no GQA), a bf16 and an FP8 cache; microseconds per launch (one layer) by
``triton.testing.do_bench`` for each ``target_programs`` of ``--targets`` (1: one partition, each context read
by one program) and the partitions that gives; the largest difference from the one-partition output.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from telechat.engine.prefix_attention import (TARGET_PROGRAMS, chunk_tables, context_partitions,  # noqa: E402
                                              prefix_prefill_attention, query_block)


def time_case(chunks: int, new_len: int, context: int, heads: int, head_dim: int, fp8: bool,
              targets: list[int]) -> dict:
    """Microseconds per launch of one step's chunks at each target program count, with the partitions each
    gives, and the largest difference of any output from the one-partition one."""
    import triton

    slots = max(chunks * context * 2, 65536)
    kc = torch.randn(slots, heads, head_dim, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    if fp8:
        kc, vc = kc.to(torch.float8_e4m3fn), vc.to(torch.float8_e4m3fn)
    perm = torch.randperm(slots, device="cuda")
    items = [SimpleNamespace(row=i * new_len, start=context - new_len, end=context,
                             context_slots=perm[i * context:(i + 1) * context]) for i in range(chunks)]
    tables = chunk_tables(items, torch.device("cuda"))
    q = torch.randn(chunks * new_len, heads, head_dim, device="cuda", dtype=torch.bfloat16)
    block = query_block(head_dim, q.element_size())
    row = dict(chunks=chunks, new_len=new_len, context=context, cache="fp8" if fp8 else "bf16", us={}, parts={})
    ref, diff = None, 0.0
    for target in [1, *[t for t in targets if t != 1]]:
        out = torch.empty_like(q)
        row["us"][target] = round(1e3 * triton.testing.do_bench(
            lambda out=out, target=target: prefix_prefill_attention(q, kc, vc, tables, out, 1.0, 1.0, target),
            warmup=50, rep=300), 1)
        row["parts"][target] = context_partitions(chunks * triton.cdiv(new_len, block) * heads, context, block,
                                                  target)[0]
        ref = out if ref is None else ref
        diff = max(diff, float((out.float() - ref.float()).abs().max()))
    row["max_abs_diff"] = diff
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chunks", default="1,2,16", help="comma-separated chunk counts per step")
    p.add_argument("--new-len", type=int, default=48)
    p.add_argument("--context", type=int, default=4433, help="cached positions + the chunk's own")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--targets", default=f"1,256,{TARGET_PROGRAMS}", help="comma-separated target program counts")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/prefix_kernel.py needs a CUDA GPU (it times a Triton kernel)")
    torch.manual_seed(0)
    for fp8 in (False, True):
        for chunks in (int(c) for c in args.chunks.split(",") if c):
            targets = [int(t) for t in args.targets.split(",") if t]
            print(json.dumps(time_case(chunks, args.new_len, args.context, args.heads, args.head_dim, fp8, targets)),
                  flush=True)


if __name__ == "__main__":
    main()
