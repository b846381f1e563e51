"""What per-request LoRA adapters cost the engine (issue 18 item 4), in one process on one set of weights.

Random weights of a released shape (default the 7B) and random PEFT adapters (``--rank``, every TeleChat
target) written to a temporary folder. Engines: the base model alone (the baseline); then with
``--max-loras`` slots and all requests on the base (the price of the LoRA path when no one uses it),
on two adapters plus the base, and spread over ``--max-loras`` adapters. For each: batch-1 decode and
``--concurrency`` requests at once (``--prompt-len`` in, ``--new-tokens`` out). One JSON line per
measurement, then a table; ``--json PATH`` also writes them.

    python bench/lora.py --json bench/results/h200-lora.json
    python bench/lora.py --preset tiny --concurrency 4 --new-tokens 8    # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine import RESULTS, add_workload_args, free_device_memory, random_prompt, record, run_requests  # noqa: E402
from bench.random_checkpoint import bench_config  # noqa: E402
from bench.report import write_json  # noqa: E402
from telechat.engine.core import EngineConfig, LLMEngine  # noqa: E402
from telechat.model.modeling import TelechatForCausalLM  # noqa: E402

TARGETS = {"query": "self_attention", "key_value": "self_attention", "dense": "self_attention",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def write_adapter(model: TelechatForCausalLM, folder: Path, rank: int, seed: int) -> Path:
    """A random PEFT adapter of ``model`` (every target, small B so the replies stay plausible) in ``folder``."""
    c, g = model.config, torch.Generator().manual_seed(seed)
    f, h = c.ffn_hidden_size, c.hidden_size
    dims = {"query": (h, c.n_head * c.head_dim), "key_value": (h, 2 * c.num_key_value_heads * c.head_dim),
            "dense": (c.n_head * c.head_dim, h), "gate_proj": (h, f), "up_proj": (h, f), "down_proj": (f, h)}
    tensors = {}
    for i in range(c.n_layer):
        for name, part in TARGETS.items():
            n_in, n_out = dims[name]
            key = f"base_model.model.transformer.h.{i}.{part}.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, n_in, generator=g) / n_in ** 0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(n_out, rank, generator=g) * 1e-3
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(TARGETS)}))
    return folder


def measure(label: str, model, args, adapters: dict[str, Path], mix: list[str | None]) -> dict:
    """bs1 (the first name of ``mix``) and concurrent throughput of an engine serving ``adapters``; request i
    of the concurrent run uses ``mix[i % len(mix)]``."""
    engine = LLMEngine(model, EngineConfig(max_num_seqs=args.concurrency, max_model_len=args.max_model_len,
                                           max_num_batched_tokens=8192, max_loras=args.max_loras if adapters else 0,
                                           max_lora_rank=args.rank))
    for name, folder in adapters.items():
        engine.load_adapter(name, str(folder))
    vocab = model.config.vocab_size
    run_requests(engine, [random_prompt(16, vocab, 1)], 16, loras=[mix[0]])  # warm-up (and the first slot load)
    bs1 = run_requests(engine, [random_prompt(args.prompt_len, vocab, 2)], args.new_tokens, loras=[mix[0]])
    prompts = [random_prompt(args.prompt_len, vocab, 1000 + i) for i in range(args.concurrency)]
    many = run_requests(engine, prompts, args.new_tokens, loras=[mix[i % len(mix)] for i in range(args.concurrency)])
    row = dict(engine=label, adapters_in_batch=len({m for m in mix if m}), bs1_tok_s=bs1["tok_s"],
               concurrent=args.concurrency, concurrent_tok_s=many["tok_s"])
    record("lora_engine", **row)
    del engine
    free_device_memory()
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(p)
    p.add_argument("--rank", type=int, default=16, help="rank of the adapters (and max_lora_rank)")
    p.add_argument("--max-loras", type=int, default=4)
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the results here")
    args = p.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    with torch.device(dev):
        model = TelechatForCausalLM(bench_config(args.preset, seq_length=args.max_model_len))
        model = model.to(torch.bfloat16 if dev.type == "cuda" else torch.float32).eval()
    with tempfile.TemporaryDirectory(prefix="telechat-bench-lora-") as tmp:
        names = [f"lora{i}" for i in range(args.max_loras)]
        adapters = {n: write_adapter(model, Path(tmp) / n, args.rank, i) for i, n in enumerate(names)}
        rows = [measure("base", model, args, {}, [None]),
                measure("lora, base requests", model, args, adapters, [None]),
                measure("lora, 2 adapters + base", model, args, adapters, [names[0], names[1 % len(names)], None]),
                measure(f"lora, {len(names)} adapters", model, args, adapters, list(names))]
    base = rows[0]
    summary = {f"ratio_{i}": round(r["concurrent_tok_s"] / base["concurrent_tok_s"], 3) for i, r in enumerate(rows)}
    record("lora_summary", rank=args.rank, max_loras=args.max_loras, **summary)
    print(f"\n| engine | bs1 tok/s | c{args.concurrency} tok/s | vs base |\n|---|---|---|---|")
    for i, r in enumerate(rows):
        print(f"| {r['engine']} | {r['bs1_tok_s']} | {r['concurrent_tok_s']} | {summary[f'ratio_{i}']} |")
    if args.json:
        write_json(args.json, RESULTS, **summary)


if __name__ == "__main__":
    main()
