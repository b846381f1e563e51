"""Profile engine decode steps (CUDA): top GPU kernels and host-side phases per step.

    python bench/profile_decode.py --preset 7B --batch 64 [--compile]
    python bench/profile_decode.py --batch 1 --fp8 --kv-cache-dtype fp8   # FP8 weights (as bench/fp8_engine.py)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.fp8_engine import quantize_in_place  # noqa: E402
from telechat.model.config import preset  # noqa: E402
from telechat.engine.core import EngineConfig, LLMEngine  # noqa: E402
from telechat.engine.sampling import SamplingParams  # noqa: E402
from telechat.model.modeling import TelechatForCausalLM  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="7B")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--max-num-seqs", type=int, default=None, help="engine size (default: --batch)")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--fp8", action="store_true", help="decoder Linears quantized to FP8 in memory (head stays bf16)")
    p.add_argument("--kv-cache-dtype", default="auto", help="auto or fp8")
    args = p.parse_args()
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = TelechatForCausalLM(preset(args.preset, seq_length=args.max_model_len)).to(torch.bfloat16).eval()
    if args.fp8:
        quantize_in_place(model)
    engine = LLMEngine(model, EngineConfig(max_num_seqs=args.max_num_seqs or max(args.batch, 1), max_model_len=args.max_model_len,
                                           compile=args.compile, kv_cache_dtype=args.kv_cache_dtype))
    params = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
    for i in range(args.batch):
        engine.add_request(torch.randint(100, 60000, (args.prompt_len,)).tolist(), params)
    for _ in range(20):  # prefill + warm decode
        engine.step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        engine.step()
    step_ms = (time.perf_counter() - t) / 20 * 1e3
    print(f"batch {args.batch}: {step_ms:.2f} ms/step, {args.batch / step_ms * 1e3:.0f} tok/s")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            engine.step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    main()
