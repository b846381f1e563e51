"""Profile the prefill of a prompt whose history is in the prefix cache (CUDA), against a fresh short prompt.

A chat turn resends its history: with the history cached, the step computes only the new tokens but
attends to the whole context. This times, in one process and on one engine: TTFT of a fresh
``--fresh-len`` prompt, of a turn adding ``--new-len`` tokens to a cached ``--history-len`` history,
and of the same turn with the cache off; then the GPU kernels and host phases of the cached turn.

    python bench/profile_prefix.py --preset 7B --history-len 4096 --new-len 160
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from telechat.engine.core import EngineConfig, LLMEngine  # noqa: E402
from telechat.engine.sampling import SamplingParams  # noqa: E402
from telechat.model.config import preset  # noqa: E402
from telechat.model.modeling import TelechatForCausalLM  # noqa: E402

ONE_TOKEN = SamplingParams(max_tokens=1, temperature=0)


def ttft_ms(engine: LLMEngine, prompt: list[int]) -> float:
    """Milliseconds from submitting ``prompt`` to its first token (engine alone, no other request)."""
    torch.cuda.synchronize()
    t = time.perf_counter()
    engine.add_request(prompt, ONE_TOKEN)
    while engine.has_unfinished():
        engine.step()
    return (time.perf_counter() - t) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="7B")
    p.add_argument("--history-len", type=int, default=4096)
    p.add_argument("--new-len", type=int, default=160)
    p.add_argument("--fresh-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = TelechatForCausalLM(preset(args.preset, seq_length=8192)).to(torch.bfloat16).eval()
    rng = random.Random(0)
    toks = lambda n: [rng.randrange(100, 60000) for _ in range(n)]  # noqa: E731
    history = toks(args.history_len)
    figures = {}
    for caching in (True, False):
        engine = LLMEngine(model, EngineConfig(max_num_seqs=8, max_model_len=8192, enable_prefix_caching=caching))
        ttft_ms(engine, toks(args.fresh_len))  # warm-up
        figures[f"fresh_ms_cache_{caching}"] = statistics.median(ttft_ms(engine, toks(args.fresh_len))
                                                                 for _ in range(args.repeats))
        ttft_ms(engine, history)  # the history enters the cache
        figures[f"turn_ms_cache_{caching}"] = statistics.median(ttft_ms(engine, history + toks(args.new_len))
                                                                for _ in range(args.repeats))
        if caching:
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                ttft_ms(engine, history + toks(args.new_len))
        del engine
        torch.cuda.empty_cache()
    for k, v in figures.items():
        print(f"{k}: {v:.1f}")
    print(f"cached turn / fresh: {figures['turn_ms_cache_True'] / figures['fresh_ms_cache_True']:.2f}")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=15, max_name_column_width=60))


if __name__ == "__main__":
    main()
