"""``telechat chat``, ``telechat generate`` and ``telechat demo-model``."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from telechat.engine.engine import EngineConfig


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by every command that loads a model (flag > env > default)."""
    p.add_argument("--model", default=os.environ.get("MODEL_PATH"),
                   help="checkpoint folder (env MODEL_PATH; default: the built-in demo model)")
    p.add_argument("--device", default=os.environ.get("DEVICE", "auto"), help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default=os.environ.get("DTYPE", "auto"),
                   help="auto | bfloat16 | float16 | float32 (env DTYPE; auto: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--max-model-len", type=int, default=_env_int("MAX_MODEL_LEN"),
                   help="longest prompt + reply (env MAX_MODEL_LEN; default: the checkpoint's seq_length)")
    p.add_argument("--rope-mode", choices=("none", "ntk", "ntk+scaling"), default=os.environ.get("ROPE_MODE"),
                   help="RoPE scaling (env ROPE_MODE; default ntk+scaling, the official behaviour)")
    p.add_argument("--training-seqlen", type=int, default=_env_int("TRAINING_SEQLEN"),
                   help="override training_seqlen (set it to the length you fine-tuned at)")
    p.add_argument("--base-seqlen", type=int, default=_env_int("BASE_SEQLEN"),
                   help="override the NTK base length (v1: 4096 for 7B layout, 8192 for 12B layout)")
    p.add_argument("--lora", default=os.environ.get("LORA_PATH"), help="LoRA adapter folder merged at load")


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


def load_runtime(args: argparse.Namespace, engine_config: EngineConfig | None = None):
    """Load the runtime that the model options describe."""
    from telechat.runtime import Runtime, resolve_model_path

    path, _ = resolve_model_path(args.model)
    cfg = engine_config or EngineConfig(max_num_seqs=4)
    cfg.max_model_len = args.max_model_len
    return Runtime.load(path, device=args.device, dtype=args.dtype, engine_config=cfg, lora=args.lora,
                        rope_mode=args.rope_mode, training_seqlen=args.training_seqlen, base_seqlen=args.base_seqlen)


def _add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=512, help="most new tokens per reply")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: generation_config)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--system", default=None, help="system prompt")


def _params(rt, args):
    return rt.sampling_params(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed)


async def _reply(rt, messages: list[dict], args, out) -> str:
    budget = rt.max_model_len - args.max_tokens
    prompt = rt.chat.encode_prompt(messages, max_tokens=max(budget, 1))
    params = _params(rt, args)
    params.max_tokens = min(args.max_tokens, rt.max_model_len - len(prompt))
    text = []
    async for delta in rt.stream(prompt, params):
        out.write(delta.text)
        out.flush()
        text.append(delta.text)
        if delta.error:
            raise RuntimeError(delta.error)
    out.write("\n")
    return "".join(text)


def generate_main(argv: list[str]) -> int:
    """Print the reply to one ``--prompt`` (streamed to stdout)."""
    p = argparse.ArgumentParser(prog="telechat generate", description="Generate a reply to one prompt.")
    add_model_arguments(p)
    _add_sampling_arguments(p)
    p.add_argument("--prompt", required=True, help="the user message")
    args = p.parse_args(argv)
    rt = load_runtime(args)
    if rt.is_demo:
        print("[demo model: not TeleChat — set --model or MODEL_PATH for real weights]", file=sys.stderr)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
        [{"role": "user", "content": args.prompt}]
    asyncio.run(_reply(rt, messages, args, sys.stdout))
    rt.engine.shutdown(grace_s=0)
    return 0


def chat_main(argv: list[str]) -> int:
    """Interactive chat: history kept across turns; ``/clear`` forgets it, ``/exit`` quits."""
    p = argparse.ArgumentParser(prog="telechat chat", description="Interactive multi-turn chat. "
                                "Commands: /clear (forget the conversation), /exit (quit).")
    add_model_arguments(p)
    _add_sampling_arguments(p)
    args = p.parse_args(argv)
    rt = load_runtime(args)
    banner = f"TeleChat chat — model {rt.name}" + (" [DEMO MODEL: not TeleChat]" if rt.is_demo else "")
    print(f"{banner}\n/clear forgets the conversation, /exit quits.")
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    try:
        while True:
            try:
                line = input("\nuser> ").strip()
            except EOFError:
                break
            if not line:
                continue
            if line in ("/exit", "/quit"):
                break
            if line == "/clear":
                history = history[:1] if args.system else []
                print("(conversation cleared)")
                continue
            history.append({"role": "user", "content": line})
            print("bot> ", end="", flush=True)
            history.append({"role": "assistant", "content": asyncio.run(_reply(rt, history, args, sys.stdout))})
    finally:
        rt.engine.shutdown(grace_s=0)
    return 0


def demo_model_main(argv: list[str]) -> int:
    """Write the demo checkpoint to OUT."""
    from telechat.demo import build_demo_model

    p = argparse.ArgumentParser(prog="telechat demo-model",
                                description="Write the small built-in demo TeleChat checkpoint (seconds, offline).")
    p.add_argument("out", help="folder to create (replaced if it exists)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-steps", type=int, default=300, help="steps of fitting the canned demo dialogs")
    args = p.parse_args(argv)
    path = build_demo_model(args.out, seed=args.seed, train_steps=args.train_steps)
    print(f"demo model written to {path}")
    return 0
