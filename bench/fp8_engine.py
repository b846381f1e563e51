"""FP8 weights and the FP8 KV cache against bf16 on the same engine, in one process (issue 20).

Random weights of a released shape (default the 7B) in bf16; then the same weights quantized in memory
to FP8 (:meth:`Fp8Linear.from_linear`: per-channel weight scales, dynamic per-token activations — what
``telechat quantize --method fp8`` writes). For each of bf16, bf16 + FP8 KV, FP8, FP8 + FP8 KV, and FP8 with
the head in FP8 too (``--quantize-head``) + FP8 KV: batch-1 decode and 64 concurrent requests (128 in / 256
out), each the median of ``--repeats`` runs after an untimed one of the same shape, and the KV capacity the
engine sizes from the same memory share; then, on the bf16
weights, one ``--long-prompt`` request (prefill + 16 tokens) with each cache, and how many such requests each
cache holds at once. Prints one JSON line per measurement, then a table;
``--json PATH`` also writes them with the run's provenance and the speedups. ``--int4`` adds the same shape as
a GPTQ int4 checkpoint (random codes, ``bench/random_checkpoint.py --gptq-bits 4``) loaded by the quant loader
(Marlin on CUDA; needs the quant extra), measured the same way with its fp16 cache, for comparison.

    python bench/fp8_engine.py --int4 --json bench/results/h200-fp8.json
    python bench/fp8_engine.py --preset tiny --concurrency 4 --new-tokens 8 --long-prompt 0   # CPU smoke run
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine import RESULTS, add_workload_args, free_device_memory, random_prompt, record, run_requests  # noqa: E402
from bench.random_checkpoint import bench_config, write_random_gptq  # noqa: E402
from bench.report import write_json  # noqa: E402
from telechat.engine.core import EngineConfig, LLMEngine  # noqa: E402
from telechat.model.fp8 import Fp8Linear  # noqa: E402
from telechat.model.modeling import TelechatForCausalLM  # noqa: E402

LINEARS = ("self_attention.query", "self_attention.key_value", "self_attention.dense", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


def quantize_in_place(model: TelechatForCausalLM, head: bool = False) -> None:
    """Every decoder Linear to FP8; the head too with ``head`` (``--quantize-head``; else it stays bf16, as the
    quant job leaves it by default). A tied head's embeddings stay bf16 for the lookups."""
    for layer in model.transformer.h:
        for name in LINEARS:
            parent, _, child = name.rpartition(".")
            setattr(layer.get_submodule(parent), child, Fp8Linear.from_linear(layer.get_submodule(name)))
    if head:
        quantize_head_in_place(model)
    free_device_memory()


def quantize_head_in_place(model: TelechatForCausalLM) -> None:
    """The head to FP8 (``--quantize-head``), e.g. after engines have fused the decoder's Linears."""
    model.lm_head = Fp8Linear.from_linear(model.lm_head)


def median_tok_s(engine: LLMEngine, workload, runs: int) -> dict:
    """Output tok/s of ``workload(i)`` (the prompts of run ``i``, fresh each run: nothing comes from the prefix
    cache): one untimed run of the same shape first (compiles, allocator and cuBLAS heuristics out of the numbers),
    then the median of ``runs`` timed ones (``tok_s``), each run's figure (``runs``), and the medians of the first
    token's latency (``ttft_ms``, p50 over the run's requests) and of the rate after it (``decode_tok_s``: the
    other tokens over the wall time after the median first token)."""
    prompts, new = workload(0)
    run_requests(engine, prompts, new)
    requests = len(prompts)
    timed = [run_requests(engine, *workload(i)) for i in range(1, runs + 1)]
    if any(r["cached_prompt_tokens"] for r in timed):
        raise RuntimeError("a timed run was served from the prefix cache; its prompts must be new")
    figures = [r["tok_s"] for r in timed]
    after_first = [(r["output_tokens"] - requests) / (r["wall_s"] - r["ttft_p50_ms"] / 1e3) for r in timed]
    return dict(tok_s=statistics.median(figures), runs=figures,
                ttft_ms=round(statistics.median(r["ttft_p50_ms"] for r in timed), 1),
                decode_tok_s=round(statistics.median(after_first), 1))


def measure(label: str, model, args, kv: str, vocab: int) -> dict:
    """bs1 and concurrent throughput of one engine over ``model`` with a ``kv`` cache (medians of ``--repeats``)."""
    engine = LLMEngine(model, EngineConfig(max_num_seqs=args.concurrency, max_model_len=args.max_model_len,
                                           max_num_batched_tokens=8192, kv_cache_dtype=kv))
    bs1 = median_tok_s(engine, lambda i: ([random_prompt(args.prompt_len, vocab, 2 + i)], args.new_tokens),
                       args.repeats)
    many = median_tok_s(engine, lambda i: ([random_prompt(args.prompt_len, vocab, 1000 * (i + 1) + j)
                                            for j in range(args.concurrency)], args.new_tokens), args.repeats)
    row = dict(weights=label, kv_cache=kv, bs1_tok_s=bs1["tok_s"], bs1_runs=bs1["runs"], bs1_ttft_ms=bs1["ttft_ms"],
               bs1_decode_tok_s=bs1["decode_tok_s"], concurrent=args.concurrency, concurrent_tok_s=many["tok_s"],
               concurrent_runs=many["runs"], concurrent_ttft_ms=many["ttft_ms"],
               kv_capacity_tokens=engine.capacity_tokens)
    record("fp8_engine", **row)
    del engine
    free_device_memory()
    return row


def long_request(model, args, kv: str, vocab: int) -> dict:
    """One ``--long-prompt`` prefill + 16 decoded tokens; how many such requests the cache holds at once."""
    need = args.long_prompt + 16
    engine = LLMEngine(model, EngineConfig(max_num_seqs=16, max_model_len=need, max_num_batched_tokens=8192,
                                           kv_cache_dtype=kv))
    fits = engine.capacity_tokens // need
    r = run_requests(engine, [random_prompt(args.long_prompt, vocab, 7)], 16) if fits else {}
    row = dict(kv_cache=kv, prompt_tokens=args.long_prompt, kv_capacity_tokens=engine.capacity_tokens,
               concurrent_long_requests=fits, wall_s=r.get("wall_s"))
    record("fp8_long_request", **row)
    del engine
    free_device_memory()
    return row


def measure_int4(args, vocab: int) -> dict:
    """The GPTQ int4 row: a random int4 checkpoint of the shape, loaded as a served one is."""
    from telechat.model.quantized import load_quantized

    path = write_random_gptq(args.preset, args.work_dir / f"{args.preset}-int4", bits=4, group_size=args.group_size,
                             seq_length=args.max_model_len)
    model = load_quantized(path, device="cuda" if torch.cuda.is_available() else "cpu")
    record("int4_kernel", kernel=type(model.transformer.h[0].mlp.down_proj).__name__,
           activations=str(model.lm_head.weight.dtype).removeprefix("torch."))
    row = measure("int4", model, args, "auto", vocab)
    del model
    free_device_memory()
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(p)
    p.add_argument("--long-prompt", type=int, default=96 * 1024, help="0 skips the long-request measurement")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the results here")
    p.add_argument("--show-gemv", action="store_true", help="print the GEMV tuning (cuBLAS/scaled_mm vs Triton)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed runs of each workload after an untimed one (each figure is their median)")
    p.add_argument("--int4", action="store_true", help="also a GPTQ int4 model of the shape (needs the quant extra)")
    p.add_argument("--group-size", type=int, default=128, help="GPTQ group size of the int4 row")
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/telechat-fp8-bench"),
                   help="where the int4 checkpoint is written (reused)")
    args = p.parse_args()
    if args.show_gemv:
        logging.basicConfig(format="%(message)s")
        logging.getLogger("telechat.engine.runner").setLevel(logging.DEBUG)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(dev):
        model = TelechatForCausalLM(bench_config(args.preset, seq_length=max(args.max_model_len,
                                                                             args.long_prompt + 16))).to(dtype).eval()
    vocab = model.config.vocab_size
    rows = [measure("bf16", model, args, "auto", vocab), measure("bf16", model, args, "fp8", vocab)]
    # the same bf16 weights with either cache: the capacity difference is the cache's alone
    long_rows = [long_request(model, args, kv, vocab) for kv in ("auto", "fp8")] if args.long_prompt else []
    del model
    free_device_memory()
    torch.manual_seed(0)
    with torch.device(dev):
        model = TelechatForCausalLM(bench_config(args.preset, seq_length=max(args.max_model_len,
                                                                             args.long_prompt + 16))).to(dtype).eval()
    quantize_in_place(model)
    rows += [measure("fp8", model, args, "auto", vocab), measure("fp8", model, args, "fp8", vocab)]
    quantize_head_in_place(model)  # the same FP8 decoder; the head now FP8 too
    rows.append(measure("fp8+head", model, args, "fp8", vocab))
    del model
    free_device_memory()
    if args.int4:
        rows.append(measure_int4(args, vocab))
    base, fp8, fp8_kv, fp8_head = rows[0], rows[2], rows[3], rows[4]

    def ratio(row: dict, key: str) -> float:
        return round(row[key] / base[key], 3)

    summary = dict(
        fp8_bs1_speedup=ratio(fp8, "bs1_tok_s"),
        fp8_bs1_decode_speedup=ratio(fp8, "bs1_decode_tok_s"),
        fp8_c64_speedup=ratio(fp8_kv, "concurrent_tok_s"),
        fp8_c64_speedup_weights_only=ratio(fp8, "concurrent_tok_s"),
        fp8_head_bs1_speedup=ratio(fp8_head, "bs1_tok_s"),
        fp8_head_bs1_decode_speedup=ratio(fp8_head, "bs1_decode_tok_s"),
        fp8_head_c64_speedup=ratio(fp8_head, "concurrent_tok_s"),
    )
    if args.int4:
        summary["int4_bs1_speedup"] = ratio(rows[5], "bs1_tok_s")
        summary["int4_c64_speedup"] = ratio(rows[5], "concurrent_tok_s")
    # capacities of the long-request engines (16 × 96K wanted: the memory share decides, not the cap)
    caps = long_rows if long_rows else rows[:2]
    summary["fp8_kv_capacity_ratio"] = round(caps[1]["kv_capacity_tokens"] / caps[0]["kv_capacity_tokens"], 3)
    if len(long_rows) == 2 and long_rows[0]["concurrent_long_requests"]:
        summary["fp8_long_requests_ratio"] = round(long_rows[1]["concurrent_long_requests"]
                                                   / long_rows[0]["concurrent_long_requests"], 3)
    record("fp8_summary", **summary)
    print("\n| weights | KV cache | bs1 tok/s | bs1 TTFT ms | bs1 after first tok/s | c%d tok/s | KV capacity |\n"
          "|---|---|---|---|---|---|---|" % args.concurrency)
    for r in rows:
        print(f"| {r['weights']} | {r['kv_cache']} | {r['bs1_tok_s']} | {r['bs1_ttft_ms']} | {r['bs1_decode_tok_s']} | "
              f"{r['concurrent_tok_s']} | {r['kv_capacity_tokens']} |")
    if args.json:
        write_json(args.json, RESULTS, **summary)


if __name__ == "__main__":
    main()
