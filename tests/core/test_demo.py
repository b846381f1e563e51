"""The built-in demo model: whole characters whatever the sampling (by construction of its
vocabulary), each canned prompt its canned answer, every other prompt the labelled notice, and one
recipe for the server and `telechat demo-model`."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch

from tests.conftest import REPO

UNSEEN = ["What is the capital of France?", "今天星期几？", "帮我写一封邮件", "解释一下量子力学", "asdf qwer", "？", "hi",
          "北京有什么好玩的地方", "Explain transformers in detail", "こんにちは", "Как дела?", "🦄🦄", "𝔸𝔹ℂ ∮ ∂x"]
ENDLESS = ["Keep writing forever", "一直写下去"]


def _first_turn_prompts() -> list[str]:
    """The README's sample prompts and the web UI's suggested ones, in both languages."""
    from services.web.i18n import _LABELS

    readme = re.findall(r'"role": "user", "content": "([^"]+)"', (REPO / "README.md").read_text(encoding="utf-8"))
    assert readme, "the README's sample request moved: update this test"
    return readme + [text for key, pair in _LABELS.items() if key.startswith("example_") for text in pair]


def _random_prompts(n: int, seed: int = 7) -> list[str]:
    """Random Chinese (common and rare characters), English words, emoji, symbols and mixes."""
    rng = random.Random(seed)
    common = "的一是不了人我在有他这中大来上个国到说们为子和你地出道也时年得就那要下以生会着去之过家学对可里后小么心多天而能好都然"
    words = "please tell me about the weather music history code river city dream how why what is a story".split()
    emoji = "😀🎈🐍🍕🌍🔥💡🎵🐱🌙⭐🍎🚗📚🎉👍"
    symbols = "∑∫≈©®™←→↑↓①②③ÄÖÜßéèçñ¿¡§¶•…‰€£¥" + "".join(chr(c) for c in range(33, 127))
    kinds = [
        lambda k: "".join(rng.choice(common) for _ in range(k)) + rng.choice(["", "？", "。"]),
        lambda k: "".join(chr(rng.randint(0x4E00, 0x9FA5)) for _ in range(k)),
        lambda k: " ".join(rng.choice(words) for _ in range(k)).capitalize() + rng.choice(["?", ".", ""]),
        lambda k: "".join(rng.choice(emoji) for _ in range(k)),
        lambda k: "".join(rng.choice(symbols) for _ in range(k)),
        lambda k: "".join(rng.choice([rng.choice(common), rng.choice(emoji), " " + rng.choice(words)]) for _ in range(k)),
    ]
    return [kinds[i % len(kinds)](rng.randint(1, 12)) for i in range(n)]


@pytest.fixture(scope="module")
def demo(demo_model_dir):
    """``reply(messages, **generate_kwargs) -> list[str]`` on the demo model, plus its parts."""
    from telechat.chat_format import ChatFormat
    from telechat.model.loader import load_model
    from telechat.tokenizer import load_tokenizer

    generation = json.loads((demo_model_dir / "generation_config.json").read_text(encoding="utf-8"))
    tokenizer = load_tokenizer(demo_model_dir)
    model = load_model(demo_model_dir, device="cpu", dtype="float32").eval()
    chat = ChatFormat(tokenizer, generation)

    def reply(messages: list[dict], *, seed: int = 0, max_new_tokens: int = 128, **kw) -> list[str]:
        ids = torch.tensor([chat.encode_prompt(messages)])
        torch.manual_seed(seed)
        out = model.generate(ids, max_new_tokens=max_new_tokens, eos_token_id=chat.stop_token_ids,
                             pad_token_id=generation["pad_token_id"], attention_mask=torch.ones_like(ids), **kw)
        return [tokenizer.decode(row[ids.shape[1]:], skip_special_tokens=True) for row in out]

    reply.tokenizer, reply.model, reply.chat = tokenizer, model, chat
    return reply


def _greedy(demo, prompt: str | list[dict], **kw) -> str:
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return demo(messages, do_sample=False, **kw)[0]


def test_every_token_the_model_can_emit_is_whole_characters(demo):
    """The structural guarantee: the (tied) output head has exactly one row per tokenizer id, and
    every id that is not a special token is byte-level text of whole UTF-8 characters (no lone
    byte of a multi-byte character exists in the vocabulary); characters outside the vocabulary
    are read as the one-character FALLBACK, so every prompt still encodes."""
    from telechat.demo import FALLBACK, byte_level_chars

    tokenizer, model = demo.tokenizer, demo.model
    assert model.lm_head.weight.shape[0] == len(tokenizer) == model.config.vocab_size
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    to_byte = {c: b for b, c in enumerate(byte_level_chars())}
    special = set(tokenizer.all_special_ids)
    for i in range(len(tokenizer)):
        if i not in special:
            piece = tokenizer.convert_ids_to_tokens(i)
            text = bytes(to_byte[c] for c in piece).decode("utf-8")  # strict: raises on a partial character
            assert text and tokenizer.decode([i]) == text, (i, piece)
    ids = tokenizer.encode("好𝔸 ok 🦄", add_special_tokens=False)
    assert tokenizer.decode(ids) == f"好{FALLBACK} ok {FALLBACK}"


def test_sampling_never_breaks_a_character(demo):
    """Sampled at high temperatures with no top-k/top-p (every token possible), over many prompts
    and seeds, no reply holds U+FFFD."""
    prompts = _first_turn_prompts() + UNSEEN + _random_prompts(12, seed=3)
    for i, prompt in enumerate(prompts):
        for temperature in (1.0, 3.0):
            texts = demo([{"role": "user", "content": prompt}], seed=i, do_sample=True, temperature=temperature,
                         top_k=0, top_p=1.0, repetition_penalty=1.0, num_return_sequences=6, max_new_tokens=48)
            assert all("\ufffd" not in t for t in texts), (prompt, temperature, texts)


def test_canned_prompts_get_their_canned_answers(demo):
    """Greedy, every canned dialog (the README's and the web UI's sample prompts among them,
    multi-turn and system-prompt ones too) gets its own answer word for word."""
    from telechat.demo import _dialogs

    dialogs = [d for d in _dialogs() if not d.get("endless")]
    single = {d["messages"][0]["content"] for d in dialogs if len(d["messages"]) == 2}
    assert set(_first_turn_prompts()) <= single
    for d in dialogs:
        assert _greedy(demo, d["messages"][:-1]) == d["messages"][-1]["content"], d["messages"][:-1]


def test_other_prompts_get_exactly_the_notice(demo):
    """Greedy, prompts the demo was not trained on (random Chinese, English, emoji, symbols, other
    scripts; alone or after a canned turn) get the labelled notice, word for word: never a mix of
    canned answers."""
    from telechat.demo import NOTICE, _dialogs

    assert NOTICE.startswith("[Demo model]")
    for prompt in UNSEEN + _random_prompts(48):
        assert _greedy(demo, prompt, max_new_tokens=64) == NOTICE, prompt
    canned_turn = next(d["messages"] for d in _dialogs() if d["messages"][0]["content"] == "谢谢")
    for prompt in UNSEEN[:3]:
        assert _greedy(demo, canned_turn + [{"role": "user", "content": prompt}], max_new_tokens=64) == NOTICE


@pytest.mark.parametrize("prompt", ENDLESS)
def test_endless_prompts_write_until_max_tokens(demo, prompt):
    """Greedy, the endless prompts never stop on their own (Stop, abort and max_tokens need them)."""
    chat = demo.chat
    ids = torch.tensor([chat.encode_prompt([{"role": "user", "content": prompt}])])
    out = demo.model.generate(ids, do_sample=False, max_new_tokens=600, eos_token_id=chat.stop_token_ids,
                              pad_token_id=demo.model.config.pad_token_id, attention_mask=torch.ones_like(ids))
    new = out[0, ids.shape[1]:].tolist()
    assert len(new) == 600 and not set(new) & set(chat.stop_token_ids)


def test_cli_and_server_build_the_same_demo(tmp_path, demo_model_dir):
    """`telechat demo-model DIR` and the server's ensure_demo_model write byte-identical folders,
    equal to build_demo_model's (the one recipe)."""
    from telechat.demo import ensure_demo_model
    from telechat.tools.chat_cli import demo_model_main

    assert demo_model_main([str(tmp_path / "cli")]) == 0
    server = ensure_demo_model(tmp_path / "server")
    files = sorted(p.relative_to(demo_model_dir) for p in demo_model_dir.rglob("*") if p.is_file())
    for folder in (tmp_path / "cli", server):
        assert sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file()) == files
        for name in files:
            assert (folder / name).read_bytes() == (demo_model_dir / name).read_bytes(), name
