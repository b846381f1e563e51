"""``telechat chat``, ``telechat generate`` and ``telechat demo-model``."""

from __future__ import annotations

import argparse
import asyncio
import sys

from services.settings_cli import build_parser, load
from telechat.engine.core import EngineConfig
from telechat.settings import ModelSettings


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A parser with the model options (``ModelSettings``: flag > env > default) and the sampling ones."""
    p = build_parser(ModelSettings, prog=prog, description=description)
    _add_sampling_arguments(p)
    return p


def load_runtime(settings: ModelSettings, engine_config: EngineConfig | None = None):
    """Load the runtime that the model settings describe."""
    from telechat.runtime import Runtime, resolve_model_path

    path, _ = resolve_model_path(settings.model_path)
    cfg = engine_config or EngineConfig(max_num_seqs=4)
    cfg.max_model_len = settings.max_model_len
    return Runtime.load(path, device=settings.device, dtype=settings.dtype, engine_config=cfg,
                        lora=settings.lora_path, rope_mode=settings.rope_mode,
                        training_seqlen=settings.training_seqlen, base_seqlen=settings.base_seqlen)


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
    p = _parser("telechat generate", "Generate a reply to one prompt.")
    p.add_argument("--prompt", required=True, help="the user message")
    args = p.parse_args(argv)
    rt = load_runtime(load(ModelSettings, args))
    if rt.is_demo:
        print("[demo model: not TeleChat — set --model or MODEL_PATH for real weights]", file=sys.stderr)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
        [{"role": "user", "content": args.prompt}]
    asyncio.run(_reply(rt, messages, args, sys.stdout))
    rt.engine.shutdown(grace_s=0)
    return 0


def chat_main(argv: list[str]) -> int:
    """Interactive chat: history kept across turns; ``/clear`` forgets it, ``/exit`` quits."""
    p = _parser("telechat chat", "Interactive multi-turn chat. Commands: /clear (forget the conversation), "
                "/exit (quit).")
    args = p.parse_args(argv)
    rt = load_runtime(load(ModelSettings, args))
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
    from telechat.demo import DEMO_TRAIN_STEPS, build_demo_model

    p = argparse.ArgumentParser(prog="telechat demo-model",
                                description="Write the small built-in demo TeleChat checkpoint (seconds, offline).")
    p.add_argument("out", help="folder to create (replaced if it exists)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-steps", type=int, default=DEMO_TRAIN_STEPS,
                   help=f"training steps (default {DEMO_TRAIN_STEPS}, the recipe the server builds)")
    args = p.parse_args(argv)
    path = build_demo_model(args.out, seed=args.seed, train_steps=args.train_steps)
    print(f"demo model written to {path}")
    return 0
