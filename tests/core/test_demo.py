"""The built-in demo model: whole characters on any prompt, a labelled canned reply to unseen ones,
and one recipe for the server and ``telechat demo-model``."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch

from tests.conftest import REPO

UNSEEN = ["What is the capital of France?", "今天星期几？", "帮我写一封邮件", "解释一下量子力学", "asdf qwer", "？", "hi",
          "北京有什么好玩的地方", "Explain transformers in detail"]


def _first_turn_prompts() -> list[str]:
    """The README's sample prompts and the web UI's suggested ones, in both languages."""
    from services.web.i18n import _LABELS

    readme = re.findall(r'"role": "user", "content": "([^"]+)"', (REPO / "README.md").read_text(encoding="utf-8"))
    assert readme, "the README's sample request moved: update this test"
    return readme + [text for key, pair in _LABELS.items() if key.startswith("example_") for text in pair]


def _random_prompts(n: int, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    words = "please tell me about the weather music history code river city dream how why what".split()
    out = []
    for _ in range(n):
        if rng.random() < 0.5:
            out.append("".join(chr(rng.randint(0x4E00, 0x9FA5)) for _ in range(rng.randint(1, 12))))
        else:
            out.append(" ".join(rng.choice(words) for _ in range(rng.randint(1, 8))).capitalize() + "?")
    return out


@pytest.fixture(scope="module")
def demo(demo_model_dir):
    from telechat.chat_format import ChatFormat
    from telechat.model.loader import load_model
    from telechat.tokenizer import load_tokenizer

    generation = json.loads((demo_model_dir / "generation_config.json").read_text(encoding="utf-8"))
    tokenizer = load_tokenizer(demo_model_dir)
    model = load_model(demo_model_dir, device="cpu", dtype="float32").eval()
    chat = ChatFormat(tokenizer, generation)

    def reply(prompt: str, sample: bool, seed: int = 0) -> str:
        ids = torch.tensor([chat.encode_prompt([{"role": "user", "content": prompt}])])
        torch.manual_seed(seed)
        knobs = {k: generation[k] for k in ("temperature", "top_k", "top_p", "repetition_penalty")} if sample else {}
        out = model.generate(ids, do_sample=sample, max_new_tokens=64, eos_token_id=chat.stop_token_ids,
                             pad_token_id=generation["pad_token_id"], attention_mask=torch.ones_like(ids), **knobs)
        return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    return reply


def test_unseen_prompts_get_the_labelled_notice(demo):
    """A prompt the demo never saw is answered (greedy) with the notice, word for word."""
    from telechat.demo import NOTICE

    assert NOTICE.startswith("[Demo model]")
    for prompt in UNSEEN:
        assert demo(prompt, sample=False) == NOTICE, prompt


def test_first_run_prompts_are_whole_characters(demo):
    """The README's and the web UI's sample prompts, and random Chinese/English ones, never decode to
    U+FFFD, greedy or sampled with the demo's generation_config defaults."""
    from telechat.demo import NOTICE

    first = _first_turn_prompts()
    for prompt in first:
        text = demo(prompt, sample=False)
        assert text and "\ufffd" not in text and text != NOTICE, (prompt, text)  # each has its own canned reply
    for i, prompt in enumerate(first + UNSEEN + _random_prompts(24)):
        for text in (demo(prompt, sample=False), demo(prompt, sample=True, seed=i)):
            assert "\ufffd" not in text, (prompt, text)


def test_cli_and_server_build_the_same_demo(monkeypatch, tmp_path):
    """`telechat demo-model` trains as many steps as the server's ensure_demo_model."""
    import telechat.demo as demo_module
    from telechat.tools.chat_cli import demo_model_main

    calls = []
    monkeypatch.setattr(demo_module, "build_demo_model", lambda out, **kw: calls.append(kw) or out)
    assert demo_model_main([str(tmp_path / "cli")]) == 0
    demo_module.ensure_demo_model(tmp_path / "server")
    steps = [kw.get("train_steps", demo_module.DEMO_TRAIN_STEPS) for kw in calls]
    assert steps == [demo_module.DEMO_TRAIN_STEPS] * 2
