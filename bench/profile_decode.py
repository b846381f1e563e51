"""Profile engine decode steps (CUDA): top GPU kernels and host-side phases per step.

    python bench/profile_decode.py --preset 7B --batch 64 [--compile]
    python bench/profile_decode.py --batch 1 --fp8 --kv-cache-dtype fp8   # FP8 weights (as bench/fp8_engine.py)
    python bench/profile_decode.py --batch 1 --fp8 --fp8-head --kv-cache-dtype fp8   # the head in FP8 too
    python bench/profile_decode.py --batch 1 --pdl both   # step time without, then with programmatic dependent launch
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine import free_device_memory  # noqa: E402
from bench.fp8_engine import quantize_in_place  # noqa: E402
from telechat.model import kernels  # noqa: E402
from telechat.model.config import preset  # noqa: E402
from telechat.engine.core import EngineConfig, LLMEngine  # noqa: E402
from telechat.engine.sampling import SamplingParams  # noqa: E402
from telechat.model.modeling import TelechatForCausalLM  # noqa: E402


def decode_step_ms(model, args) -> tuple[LLMEngine, float]:
    """A fresh engine over ``model`` with ``--batch`` requests past their prefill, and its mean step time."""
    engine = LLMEngine(model, EngineConfig(max_num_seqs=args.max_num_seqs or max(args.batch, 1), max_model_len=args.max_model_len,
                                           compile=args.compile, kv_cache_dtype=args.kv_cache_dtype))
    params = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
    for i in range(args.batch):
        engine.add_request(torch.randint(100, 60000, (args.prompt_len,)).tolist(), params)
    for _ in range(20):  # prefill + warm decode
        engine.step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
    return engine, (time.perf_counter() - t) / args.steps * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="7B")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--max-num-seqs", type=int, default=None, help="engine size (default: --batch)")
    p.add_argument("--steps", type=int, default=20, help="decode steps timed")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--fp8", action="store_true", help="decoder Linears quantized to FP8 in memory (head stays bf16)")
    p.add_argument("--fp8-head", action="store_true", help="with --fp8: the head in FP8 too (--quantize-head)")
    p.add_argument("--kv-cache-dtype", default="auto", help="auto or fp8")
    p.add_argument("--pdl", choices=("on", "off", "both"), default="on",
                   help="programmatic dependent launch of the decode kernels (both: off, then on, same model)")
    p.add_argument("--pdl-max-rows", type=int, default=kernels.PDL_MAX_ROWS,
                   help="launches over more rows run plainly (default %(default)s)")
    args = p.parse_args()
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = TelechatForCausalLM(preset(args.preset, seq_length=args.max_model_len)).to(torch.bfloat16).eval()
    if args.fp8:
        quantize_in_place(model, head=args.fp8_head)
    kernels.PDL_MAX_ROWS = args.pdl_max_rows
    steps = {}
    for pdl in {"on": [True], "off": [False], "both": [False, True]}[args.pdl]:
        engine = None  # the previous engine's memory goes back before the next one sizes its KV pool
        free_device_memory()
        kernels.PDL = pdl
        engine, steps[pdl] = decode_step_ms(model, args)
        print(f"batch {args.batch}, PDL {'on' if pdl else 'off'}: {steps[pdl]:.3f} ms/step, "
              f"{args.batch / steps[pdl] * 1e3:.0f} tok/s", flush=True)
    if len(steps) == 2:
        print(f"PDL off ÷ on: {steps[False] / steps[True]:.3f}")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            engine.step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    main()
