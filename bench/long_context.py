"""Long-context benchmarks (issue 9).

``python bench/long_context.py --preset 7B --lengths 32768,98304``
    Prefill + decode through our engine for a released model shape with random weights: time to
    the first token (the whole chunked prefill), decode tok/s and peak GPU memory per prompt
    length. One JSON line per measurement, then a Markdown table.

``python bench/long_context.py train --data A.jsonl [B.jsonl ...] --tokenizer DIR --output DIR``
    BENCH UTILITY ONLY, NOT THE PROJECT'S FINE-TUNE JOB: a minimal from-scratch causal-LM loop
    (random crops of the concatenated data, loss on every token) for the long-context
    reproduction when ``telechat finetune --from-scratch`` is not available. It writes a plain
    TeleChat checkpoint (config, weights, tokenizer, generation_config.json).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))

log = logging.getLogger("bench.long_context")

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


# ---------------------------------------------------------------------------------------------
# engine: prefill + decode at long prompt lengths


def build_random_model(preset_name: str, dtype: torch.dtype, device: str, **overrides):
    """A :class:`TelechatForCausalLM` of a released shape with random weights, built on ``device``."""
    from telechat.model.config import preset
    from telechat.model.modeling import TelechatForCausalLM

    config = preset(preset_name, architectures=["TelechatForCausalLM"], **overrides)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # allocate in the target dtype: no fp32 copy of 7B weights
    try:
        with torch.device(device):
            model = TelechatForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def measure(engine, prompt: list[int], decode_tokens: int, device: torch.device) -> dict:
    """Run one request alone: prefill seconds (to the first token), decode tok/s, peak memory."""
    from telechat.engine.sampling import SamplingParams

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    first = None
    tokens = 0
    engine.add_request(prompt, SamplingParams(max_tokens=decode_tokens, temperature=0, ignore_eos=True))
    while engine.has_unfinished():
        for out in engine.step():
            tokens += len(out.new_token_ids)
            if first is None and tokens:
                first = time.perf_counter()
            if out.error:
                raise RuntimeError(out.error)
    end = time.perf_counter()
    peak = torch.cuda.max_memory_allocated(device) if cuda else 0
    return {
        "prompt_tokens": len(prompt), "decode_tokens": tokens, "prefill_s": round(first - start, 3),
        "prefill_tok_s": round(len(prompt) / (first - start), 1),
        "decode_tok_s": round((tokens - 1) / (end - first), 2) if tokens > 1 else None,
        "peak_mem_gib": round(peak / 2**30, 2),
    }


def engine_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="bench/long_context.py", description="Long-prompt prefill + decode through "
                                "the engine (random weights). For training see `bench/long_context.py train -h`.")
    p.add_argument("--preset", default="7B", help="released shape: 7B, 12B, 1B")
    p.add_argument("--lengths", default="32768,98304", help="prompt lengths in tokens")
    p.add_argument("--decode-tokens", type=int, default=64, help="tokens generated after each prompt")
    p.add_argument("--chunk", type=int, default=8192, help="engine max_num_batched_tokens (prefill chunk)")
    p.add_argument("--layers", type=int, help="override the layer count (quick smoke runs)")
    p.add_argument("--rope-mode", default="ntk+scaling")
    p.add_argument("--training-seqlen", type=int, default=8192, help="as the released configs")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    args = p.parse_args(argv)

    from telechat.engine.core import EngineConfig, LLMEngine

    lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    overrides = dict(rope_mode=args.rope_mode, training_seqlen=args.training_seqlen,
                     seq_length=max(lengths) + args.decode_tokens + 1)
    if args.layers:
        overrides["n_layer"] = args.layers
    model = build_random_model(args.preset, DTYPES[args.dtype], args.device, **overrides)
    device = next(model.parameters()).device
    engine = LLMEngine(model, EngineConfig(max_num_seqs=1, max_model_len=overrides["seq_length"],
                                           max_num_batched_tokens=args.chunk))
    gen = torch.Generator().manual_seed(0)
    # Warm-up (kernels, allocator) on a short prompt so the first measured length is not penalised.
    measure(engine, torch.randint(0, model.config.vocab_size, (args.chunk,), generator=gen).tolist(), 4, device)
    rows = []
    for length in lengths:
        prompt = torch.randint(0, model.config.vocab_size, (length,), generator=gen).tolist()
        rope = model.transformer.rotary.params(length)
        row = {"bench": "long_context_engine", "preset": args.preset, "layers": model.config.n_layer,
               "dtype": args.dtype, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "chunk": args.chunk, "alpha": rope.alpha, "mscale": round(rope.mscale, 4),
               **measure(engine, prompt, args.decode_tokens, device)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    print("\n| prompt tokens | prefill s | prefill tok/s | decode tok/s | peak GiB | NTK alpha | mscale |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['prompt_tokens']} | {r['prefill_s']} | {r['prefill_tok_s']} | {r['decode_tok_s']} "
              f"| {r['peak_mem_gib']} | {r['alpha']:g} | {r['mscale']} |")
    return 0


# ---------------------------------------------------------------------------------------------
# BENCH-ONLY fallback trainer (prefer `telechat finetune --from-scratch`)


def train_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="bench/long_context.py train", description=(
        "BENCH UTILITY, not the fine-tune job: train a small TeleChat from scratch on random crops of "
        "the data, at --seq-len. training_seqlen = base_seqlen = --seq-len, so plain RoPE is what it "
        "learns and the three eval-ppl modes coincide up to that length."))
    p.add_argument("--data", nargs="+", required=True, help="jsonl / text files (eval-ppl's formats)")
    p.add_argument("--tokenizer", required=True, help="tokenizer folder")
    p.add_argument("--output", required=True, help="checkpoint folder to write")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    from telechat.model.config import TelechatConfig
    from telechat.tools.eval_ppl import load_token_ids
    from telechat.model.modeling import TelechatForCausalLM
    from telechat.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    ids = torch.tensor([t for f in args.data for t in load_token_ids(f, tokenizer)], dtype=torch.long)
    log.info("training data: %d tokens from %d files", ids.numel(), len(args.data))
    specials = {k: tokenizer.convert_tokens_to_ids(v) for k, v in
                (("user_token_id", "<_user>"), ("bot_token_id", "<_bot>"), ("eos_token_id", "<_end>"))}
    config = TelechatConfig(
        vocab_size=64 * math.ceil(len(tokenizer) / 64), hidden_size=args.hidden, n_layer=args.layers,
        n_head=args.heads, ffn_hidden_size=64 * math.ceil(8 * args.hidden / 3 / 64),
        training_seqlen=args.seq_len, base_seqlen=args.seq_len, seq_length=args.seq_len,
        tie_word_embeddings=True, architectures=["TelechatForCausalLM"], use_cache=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=specials["eos_token_id"], pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    device = torch.device(args.device)
    model = TelechatForCausalLM(config).to(device).train()
    log.info("model: %.1fM parameters", sum(p.numel() for p in model.parameters()) / 1e6)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 *
                                              (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    span = ids.numel() - args.seq_len
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        starts = [rng.randrange(span) for _ in range(args.batch_size)]
        batch = torch.stack([ids[s : s + args.seq_len] for s in starts]).to(device)
        with autocast:
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == args.steps:
            log.info("step %d/%d loss %.3f (%.1f s)", step, args.steps, loss.item(), time.perf_counter() - start)
    out = Path(args.output)
    model.eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    generation = {"bos_token_id": tokenizer.bos_token_id, "pad_token_id": tokenizer.pad_token_id, **specials}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
    log.info("wrote %s", out)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if argv[:1] == ["train"]:
        return train_main(argv[1:])
    return engine_main(argv)


if __name__ == "__main__":
    sys.exit(main())
