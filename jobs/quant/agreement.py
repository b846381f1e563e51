"""Greedy agreement of a quantized model with its original over a fixed set of golden prompts.

Perplexity measures the average next-token loss; agreement measures what a user sees: the same
prompts decoded greedily by both models, compared token by token. Reported as the number of
identical continuations and the share of the original's tokens produced before the first
divergence (after a divergence the two continuations condition on different text, so later
matches mean little).
"""

from __future__ import annotations

import torch

from telechat.chat_format import ChatFormat

GOLDEN_PROMPTS = (
    "你好，请介绍一下你自己。",
    "用三句话解释什么是大语言模型。",
    "请写一首关于春天的五言绝句。",
    "北京和上海各有哪些著名的景点？",
    "一个长方形的长是8厘米，宽是5厘米，它的面积是多少？",
    "把下面这句话翻译成英文：今天天气很好，我们去公园散步吧。",
    "Explain the difference between a list and a tuple in Python.",
    "Write a short email asking a colleague to review a document by Friday.",
)
"""Single-turn chats, Chinese and English, of the kinds TeleChat is asked (fixed, so reports compare)."""
NEW_TOKENS = 32
"""Greedy tokens per prompt: long enough for early divergences to show, short enough for a CPU run."""


def golden_prompt_ids(chat: ChatFormat) -> list[list[int]]:
    """The golden prompts as chat-format prompt ids (ending with the bot marker)."""
    return [chat.encode_prompt([{"role": "user", "content": text}]) for text in GOLDEN_PROMPTS]


@torch.inference_mode()
def greedy_continuations(model, prompts: list[list[int]], stop_ids: list[int],
                         new_tokens: int = NEW_TOKENS) -> list[list[int]]:
    """Greedy continuation of each prompt (at most ``new_tokens``, ending at a stop id)."""
    device = next(model.parameters()).device
    outputs = []
    for prompt in prompts:
        ids = torch.tensor([prompt], device=device)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                             eos_token_id=stop_ids, pad_token_id=stop_ids[0])
        outputs.append(out[0, len(prompt):].tolist())
    return outputs


def agreement(reference: list[list[int]], other: list[list[int]]) -> tuple[int, float]:
    """``(identical continuations, % of the reference's tokens before the first divergence)``."""
    identical = sum(a == b for a, b in zip(reference, other))
    matched = sum(_common_prefix(a, b) for a, b in zip(reference, other))
    total = sum(map(len, reference))
    return identical, 100.0 * matched / total if total else 100.0


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
