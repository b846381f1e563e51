"""Engine benchmark (no HTTP): single-stream decode, TTFT, aggregate throughput, long prefill.

Random weights of a released shape (default the 7B), bf16 on CUDA. The baseline — transformers
``generate()`` on the same model object — and the roofline (measured copy bandwidth over weight
bytes) are measured in the same process. Prints one JSON line per measurement, then a table.

    python bench/engine.py --preset 7B --concurrency 1,16,64,256 --long-prompt 32768
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from telechat.model.config import preset  # noqa: E402
from telechat.engine.engine import EngineConfig, LLMEngine  # noqa: E402
from telechat.engine.sampling import SamplingParams  # noqa: E402
from telechat.model.modeling import TelechatForCausalLM  # noqa: E402

RESULTS: list[dict] = []


def record(name: str, **values) -> None:
    """Print one measurement as a JSON line and keep it for the table."""
    row = {"measure": name, **values}
    RESULTS.append(row)
    print(json.dumps(row), flush=True)


def copy_bandwidth(device: str) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + written)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    return 2 * src.numel() * 20 / (start.elapsed_time(end) / 1e3)


def random_prompt(n: int, vocab: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab - 100, (n,), generator=g).tolist()


def hf_generate_tps(model, prompt_len: int, new: int) -> float:
    """transformers generate() at batch 1, greedy, fixed length (the baseline)."""
    ids = torch.tensor([random_prompt(prompt_len, model.config.vocab_size, 0)], device=model.device)
    kw = dict(do_sample=False, max_new_tokens=new, min_new_tokens=new, eos_token_id=None, pad_token_id=0)
    model.generate(ids, **{**kw, "max_new_tokens": 8, "min_new_tokens": 8})
    torch.cuda.synchronize()
    t = time.perf_counter()
    model.generate(ids, **kw)
    torch.cuda.synchronize()
    return new / (time.perf_counter() - t)


def run_requests(engine: LLMEngine, prompts: list[list[int]], new: int) -> dict:
    """Submit all prompts at once, run to completion; return timing figures."""
    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
    t0 = time.perf_counter()
    for p in prompts:
        engine.add_request(p, params)
    first: dict[str, float] = {}
    tokens = 0
    while engine.has_unfinished():
        for out in engine.step():
            tokens += len(out.new_token_ids)
            first.setdefault(out.request_id, time.perf_counter() - t0)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    ttft = sorted(first.values())
    return {"output_tokens": tokens, "wall_s": round(wall, 3), "tok_s": round(tokens / wall, 1),
            "ttft_p50_ms": round(1e3 * ttft[len(ttft) // 2], 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="7B")
    p.add_argument("--layers", type=int, default=None, help="override layer count (quick runs)")
    p.add_argument("--concurrency", default="1,16,64,256")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--ttft-prompt", type=int, default=1024)
    p.add_argument("--long-prompt", type=int, default=32768, help="0 skips the long-prefill measurement")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--skip-hf", action="store_true", help="skip the transformers generate() baseline")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/engine.py needs a CUDA GPU")
    dev = "cuda"
    overrides = {"n_layer": args.layers} if args.layers else {}
    max_len = args.max_model_len or max(args.long_prompt + 16, 8192)
    cfg = preset(args.preset, seq_length=max_len, **overrides)
    torch.manual_seed(0)
    with torch.device(dev):
        model = TelechatForCausalLM(cfg).to(torch.bfloat16).eval()
    weight_bytes = sum(t.numel() * t.element_size() for t in model.parameters())
    bw = copy_bandwidth(dev)
    record("roofline", card=torch.cuda.get_device_name(), copy_TBps=round(bw / 1e12, 2),
           weights_GB=round(weight_bytes / 1e9, 2), bs1_roofline_tok_s=round(bw / weight_bytes, 1))
    if not args.skip_hf:
        record("hf_generate_bs1", tok_s=round(hf_generate_tps(model, args.prompt_len, args.new_tokens), 1))
    t = time.perf_counter()
    engine = LLMEngine(model, EngineConfig(max_num_seqs=args.max_num_seqs, max_model_len=max_len,
                                           max_num_batched_tokens=8192))
    record("engine_start", seconds=round(time.perf_counter() - t, 1), kv_capacity_tokens=engine.capacity_tokens,
           compiled=engine.runner.compile)
    run_requests(engine, [random_prompt(16, cfg.vocab_size, 1)], 16)  # warm-up
    if engine.runner.graphs:
        graph = engine.runner.graphs[1][0]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(50):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        record("decode_graph_replay_bs1", ms=round(start.elapsed_time(end) / 50, 3),
               weight_read_floor_ms=round(weight_bytes / bw * 1e3, 3))
    single = run_requests(engine, [random_prompt(args.prompt_len, cfg.vocab_size, 2)], args.new_tokens)
    record("engine_bs1_decode", tok_s=single["tok_s"], wall_s=single["wall_s"])
    ttfts = []
    for i in range(5):
        r = run_requests(engine, [random_prompt(args.ttft_prompt, cfg.vocab_size, 10 + i)], 1)
        ttfts.append(r["ttft_p50_ms"])
    record("engine_ttft", prompt_tokens=args.ttft_prompt, ms_median=sorted(ttfts)[2])
    for c in [int(x) for x in args.concurrency.split(",") if x]:
        prompts = [random_prompt(args.prompt_len, cfg.vocab_size, 100 + i) for i in range(c)]
        r = run_requests(engine, prompts, args.new_tokens)
        record("engine_concurrency", concurrency=c, **r)
    if args.long_prompt:
        torch.cuda.reset_peak_memory_stats()
        r = run_requests(engine, [random_prompt(args.long_prompt, cfg.vocab_size, 7)], 16)
        record("engine_long_prefill", prompt_tokens=args.long_prompt, ttft_s=round(r["ttft_p50_ms"] / 1e3, 2),
               peak_GiB=round(torch.cuda.max_memory_allocated() / 2**30, 1))
    print("\n| measure | values |\n|---|---|")
    for row in RESULTS:
        print(f"| {row['measure']} | " + ", ".join(f"{k}={v}" for k, v in row.items() if k != "measure") + " |")


if __name__ == "__main__":
    main()
