"""Serving a base model plus a LoRA adapter folder, without a merged checkpoint on disk."""

from __future__ import annotations

import httpx
import torch

from telechat.model.loader import load_model
from telechat.engine.core import LLMEngine
from telechat.engine.sampling import SamplingParams
from telechat.engine.text import TextStream
from telechat.runtime import merge_adapter
from telechat.chat_format import ChatFormat
from telechat.tokenizer import load_tokenizer

TARGETS = ["query", "key_value", "dense", "gate_proj", "up_proj", "down_proj"]
QUESTION = [{"role": "user", "content": "你好"}]


def _adapter(base_dir, out):
    """A PEFT LoRA adapter with non-zero random B matrices, so it really changes the model."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(load_model(base_dir, device="cpu"),
                                LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False))
    peft_model.save_pretrained(out)
    return out


def _greedy(model, prompt: list[int], stop: list[int]) -> list[int]:
    engine = LLMEngine(model)
    return engine.generate([prompt], SamplingParams(max_tokens=24, temperature=0, stop_token_ids=stop))[0]


def test_api_serves_base_plus_adapter_like_the_merged_model(demo_model_dir, api_server, tmp_path):
    """`--lora DIR` answers exactly what base+adapter merged in memory answers, and differs from the base."""
    adapter = _adapter(demo_model_dir, tmp_path / "adapter")
    tok = load_tokenizer(demo_model_dir)
    chat = ChatFormat(tok, None)
    prompt = chat.encode_prompt(QUESTION)
    merged = merge_adapter(load_model(demo_model_dir, device="cpu"), adapter)
    # Decoded as the server decodes: a character cut in half by max_tokens is dropped, not sent as U+FFFD.
    expected = TextStream(tok, skip_token_ids=chat.stop_token_ids).feed(_greedy(merged, prompt, chat.stop_token_ids),
                                                                         finished=True)
    base = tok.decode(_greedy(load_model(demo_model_dir, device="cpu"), prompt, chat.stop_token_ids),
                      skip_special_tokens=True)
    assert expected != base, "the adapter should change the reply"
    server = api_server(demo_model_dir, "--lora", str(adapter))
    body = {"messages": QUESTION, "max_tokens": 24, "temperature": 0, "repetition_penalty": 1.0}
    reply = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()
    assert reply["choices"][0]["message"]["content"] == expected


def test_bad_adapter_folder_is_a_one_line_error(demo_model_dir, tmp_path):
    """A folder without adapter_config.json is refused with a message naming it."""
    import subprocess
    import sys

    (tmp_path / "not-an-adapter").mkdir()
    done = subprocess.run([sys.executable, "-m", "services.api", "--model", str(demo_model_dir), "--lora",
                           str(tmp_path / "not-an-adapter"), "--port", "0"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: ") and "adapter_config.json" in done.stderr
    assert "Traceback" not in done.stderr
