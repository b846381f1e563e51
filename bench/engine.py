"""Engine benchmark (no HTTP): single-stream decode, TTFT, aggregate throughput, long prefill.

Random weights of a released shape (default the 7B; ``tiny`` for a CPU smoke run) built in this
process, or a checkpoint folder (``--model``, e.g. one from bench/random_checkpoint.py); bf16 on
CUDA, float32 on CPU (CPU figures only show that the script works). The baseline — transformers
``generate()`` on the same model object — and the roofline (measured copy bandwidth over weight
bytes) are measured in the same process. Prints one JSON line per measurement, then a table;
``--json PATH`` also writes them, with date, command, commit, device and torch version.

    python bench/engine.py --preset 7B --concurrency 1,16,64,256 --long-prompt 32768
    python bench/engine.py --model /tmp/telechat-bench/7B --concurrency 64 --json engine.json
    python bench/engine.py --preset 12B --concurrency 64 --constrained-fraction 0,0.25,1 --skip-hf --long-prompt 0
    python bench/engine.py --preset tiny --concurrency 2 --new-tokens 8 --ttft-prompt 32 --long-prompt 0 \\
        --max-model-len 512                                                      # CPU smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.random_checkpoint import PRESET_NAMES, bench_config  # noqa: E402
from bench.report import write_json  # noqa: E402
from telechat.engine.core import EngineConfig, LLMEngine  # noqa: E402
from telechat.engine.sampling import SamplingParams  # noqa: E402
from telechat.model.modeling import TelechatForCausalLM  # noqa: E402

RESULTS: list[dict] = []
JSON_PATH: Path | None = None


def record(name: str, **values) -> None:
    """Print one measurement as a JSON line, keep it for the table and rewrite ``--json`` (partial runs keep it)."""
    row = {"measure": name, **values}
    RESULTS.append(row)
    print(json.dumps(row), flush=True)
    if JSON_PATH:
        write_json(JSON_PATH, RESULTS)


def sync() -> None:
    """Wait for queued GPU work (nothing to wait for on CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def copy_bandwidth(device: torch.device) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + written)."""
    nbytes, reps = (1 << 30, 20) if device.type == "cuda" else (64 << 20, 5)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync()
    t = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    sync()
    return 2 * nbytes * reps / (time.perf_counter() - t)


def free_device_memory() -> None:
    """Give the memory of dropped engines back to the device (the next engine sizes its KV pool from what is free)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def add_workload_args(p: argparse.ArgumentParser, max_model_len: int = 4096) -> None:
    """The flags of a fixed-shape comparison run (bench/fp8_engine.py, bench/lora.py): one concurrency level."""
    p.add_argument("--preset", default="7B", choices=PRESET_NAMES, help="shape of the random weights")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--max-model-len", type=int, default=max_model_len)


def random_prompt(n: int, vocab: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab - 100, (n,), generator=g).tolist()


def hf_generate_tps(model, prompt_len: int, new: int) -> float:
    """transformers generate() at batch 1, greedy, fixed length (the baseline)."""
    ids = torch.tensor([random_prompt(prompt_len, model.config.vocab_size, 0)], device=model.device)
    kw = dict(do_sample=False, max_new_tokens=new, min_new_tokens=new, eos_token_id=None, pad_token_id=0)
    model.generate(ids, **{**kw, "max_new_tokens": 8, "min_new_tokens": 8})
    sync()
    t = time.perf_counter()
    model.generate(ids, **kw)
    sync()
    return new / (time.perf_counter() - t)


CONSTRAINED_GRAMMAR = r'''root ::= "[" obj (", " obj)*
obj ::= "{\"id\": " [0-9]+ ", \"name\": \"" [^"\\\r\n]* "\", \"tags\": [" tag (", " tag)* "]}"
tag ::= "\"a\"" | "\"b\""
'''
"""The grammar of ``--constrained-fraction`` requests: a JSON list of objects (integers, JSON-string
characters, enums) that never closes, so every token of the reply is masked whatever the random
weights pick (free text inside a string is the costly state to mask, as in real replies)."""


def level_prompts(concurrency: int, run: int, prompt_len: int, vocab: int) -> list[list[int]]:
    """The ``concurrency`` prompts of one measured run (``run`` 0: the unconstrained level, ``k + 1``: its
    ``k``-th constrained fraction). Seeds are unique per level and per run: a prompt another run prefilled
    would come from the prefix cache (cheaper prefill, another attention path) and skew its TTFT and wall time."""
    return [random_prompt(prompt_len, vocab, 10**6 * run + 1000 * concurrency + i) for i in range(concurrency)]


def run_requests(engine: LLMEngine, prompts: list[list[int]], new: int, constrained: float = 0.0,
                 loras: list[str | None] | None = None) -> dict:
    """Submit all prompts at once (the first ``constrained`` fraction with a JSON-schema grammar; prompt i
    with the LoRA adapter ``loras[i]`` when given), run to completion; return timing figures and the prompt
    tokens served from the prefix cache (0 when every prompt is new, as the measurements want)."""
    from telechat.engine.guided import GrammarSpec

    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
    guided = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True,
                            guided=GrammarSpec("ebnf", CONSTRAINED_GRAMMAR))
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(p, guided if i < round(constrained * len(prompts)) else params,
                           lora=loras[i] if loras else None)
    first: dict[str, float] = {}
    tokens = cached = 0
    while engine.has_unfinished():
        for out in engine.step():
            tokens += len(out.new_token_ids)
            if out.new_token_ids:
                first.setdefault(out.request_id, time.perf_counter() - t0)
            if out.finished:
                cached += out.num_cached_tokens
    sync()
    wall = time.perf_counter() - t0
    ttft = sorted(first.values())
    return {"output_tokens": tokens, "wall_s": round(wall, 3), "tok_s": round(tokens / wall, 1),
            "ttft_p50_ms": round(1e3 * ttft[len(ttft) // 2], 1), "cached_prompt_tokens": cached}


def load(args, device: torch.device, max_len: int):
    """The model under test: ``--model``'s checkpoint, or random weights of ``--preset``."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.model:
        from telechat.model.loader import load_model

        return load_model(args.model, device=device.type, dtype=dtype)
    overrides = {"n_layer": args.layers} if args.layers else {}
    torch.manual_seed(0)
    with torch.device(device):
        return TelechatForCausalLM(bench_config(args.preset, seq_length=max_len, **overrides)).to(dtype).eval()


def main() -> None:
    global JSON_PATH
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="7B", choices=PRESET_NAMES, help="shape of the random weights")
    p.add_argument("--model", type=Path, help="benchmark this checkpoint folder instead of random weights")
    p.add_argument("--layers", type=int, default=None, help="override layer count (quick runs; --preset only)")
    p.add_argument("--concurrency", default="1,16,64,256")
    p.add_argument("--waves", type=int, default=1, help="requests per level = waves x concurrency, all submitted at "
                   "once: with --max-num-seqs equal to the level, later ones start as earlier ones finish (as "
                   "bench/serve_load.py's clients send them)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--ttft-prompt", type=int, default=1024)
    p.add_argument("--long-prompt", type=int, default=32768, help="0 skips the long-prefill measurement")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--skip-hf", action="store_true", help="skip the transformers generate() baseline")
    p.add_argument("--constrained-fraction", default="", metavar="F,F,...",
                   help="also measure each --concurrency level with these fractions of JSON-schema constrained "
                        "requests (e.g. 0,0.25,1; structured output, docs/engine.md)")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="tokenizer of the constrained requests' grammar (default: --model, else the 12B fixture)")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the results here (rewritten after each)")
    args = p.parse_args()
    if args.model and args.layers:
        raise SystemExit("bench/engine.py: --layers applies to --preset random weights, not to --model")
    JSON_PATH = args.json
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    max_len = args.max_model_len or max(args.long_prompt + 16, 8192)
    model = load(args, dev, max_len)
    vocab = model.config.vocab_size
    weight_bytes = sum(t.numel() * t.element_size() for t in model.parameters())
    bw = copy_bandwidth(dev)
    record("roofline", card=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
           copy_TBps=round(bw / 1e12, 2), weights_GB=round(weight_bytes / 1e9, 2),
           bs1_roofline_tok_s=round(bw / weight_bytes, 1), weight_read_floor_ms=round(weight_bytes / bw * 1e3, 3))
    if not args.skip_hf:
        record("hf_generate_bs1", tok_s=round(hf_generate_tps(model, args.prompt_len, args.new_tokens), 1))
        if dev.type == "cuda":
            torch.cuda.empty_cache()  # the engine sizes its KV pool from free memory
    t = time.perf_counter()
    config = EngineConfig(max_num_seqs=args.max_num_seqs, max_model_len=max_len, max_num_batched_tokens=8192)
    grammars = None
    if args.constrained_fraction:
        from telechat.engine.guided import GrammarCompiler

        tokenizer = args.tokenizer or args.model or Path(__file__).resolve().parents[1] / "tests/fixtures/tokenizer-12b"
        grammars = GrammarCompiler.from_path(str(tokenizer), vocab)
    engine = LLMEngine(model, config, grammars=grammars)
    if grammars is not None:  # the first compile builds the tokenizer's token table: not part of decoding
        from telechat.engine.guided import GrammarSpec

        t = time.perf_counter()
        grammars.compile(GrammarSpec("ebnf", CONSTRAINED_GRAMMAR))
        record("grammar_compile", seconds=round(time.perf_counter() - t, 2))
    record("engine_start", seconds=round(time.perf_counter() - t, 1),
           kv_capacity_tokens=engine.stats().get("kv_capacity_tokens"), compiled=config.compile)
    run_requests(engine, [random_prompt(16, vocab, 1)], 16)  # warm-up
    single = run_requests(engine, [random_prompt(args.prompt_len, vocab, 2)], args.new_tokens)
    record("engine_bs1_decode", tok_s=single["tok_s"], wall_s=single["wall_s"],
           ms_per_token=round(1e3 * single["wall_s"] / args.new_tokens, 3), ttft_ms=single["ttft_p50_ms"],
           ms_per_token_after_first=round((1e3 * single["wall_s"] - single["ttft_p50_ms"]) / (args.new_tokens - 1), 3))
    ttfts = []
    for i in range(5):
        r = run_requests(engine, [random_prompt(args.ttft_prompt, vocab, 10 + i)], 1)
        ttfts.append(r["ttft_p50_ms"])
    record("engine_ttft", prompt_tokens=args.ttft_prompt, ms_median=sorted(ttfts)[2])
    for c in [int(x) for x in args.concurrency.split(",") if x]:
        r = run_requests(engine, level_prompts(c * args.waves, 0, args.prompt_len, vocab), args.new_tokens)
        record("engine_concurrency", concurrency=c, requests=c * args.waves, **r)
        for k, f in enumerate(float(x) for x in args.constrained_fraction.split(",") if x):
            r = run_requests(engine, level_prompts(c, k + 1, args.prompt_len, vocab), args.new_tokens, constrained=f)
            record("engine_constrained", concurrency=c, constrained_fraction=f, **r)
    if args.long_prompt:
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        r = run_requests(engine, [random_prompt(args.long_prompt, vocab, 7)], 16)
        peak = round(torch.cuda.max_memory_allocated() / 2**30, 1) if dev.type == "cuda" else None
        record("engine_long_prefill", prompt_tokens=args.long_prompt, ttft_s=round(r["ttft_p50_ms"] / 1e3, 2),
               peak_GiB=peak)
    print("\n| measure | values |\n|---|---|")
    for row in RESULTS:
        print(f"| {row['measure']} | " + ", ".join(f"{k}={v}" for k, v in row.items() if k != "measure") + " |")


if __name__ == "__main__":
    main()
