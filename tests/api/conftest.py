"""Fixtures of the API tests: running servers over the demo model and over a tiny model that
speaks through the real TeleChat-12B tokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

LOOP_TEXT = "你好，世界！😀 TeleChat 中文测试：天气晴朗🌞。"
"""What the 12B-tokenizer model says, over and over: Chinese, a vocabulary emoji (😀) and a
byte-fallback emoji (🌞 = four <0x..> pieces), each token appearing once per loop."""


@pytest.fixture(scope="session")
def demo_server(demo_model_dir, api_server):
    """The API over the demo model, 16 sequences per batch."""
    return api_server(demo_model_dir, "--max-num-seqs", "16")


@pytest.fixture(scope="session")
def loop_model_dir(tmp_path_factory, tokenizer_12b_dir) -> Path:
    """A tiny TeleChat checkpoint (vocab 120000, hidden 64) with the real 12B tokenizer whose greedy
    reply to any prompt repeats :data:`LOOP_TEXT`.

    Built by hand, no training: the block outputs are zeroed, so the logits depend on the last token
    only (a bigram table); one-hot embeddings and an ``lm_head`` row per successor chain the tokens
    of ``LOOP_TEXT`` into a cycle that ``<_bot>`` enters.
    """
    import torch

    from telechat.model.config import TelechatConfig
    from telechat.model.modeling import TelechatForCausalLM
    from telechat.tokenizer import load_tokenizer

    out = tmp_path_factory.mktemp("loop-12b") / "loop-12b"
    out.mkdir()
    for f in tokenizer_12b_dir.iterdir():
        shutil.copy(f, out / f.name)
    ids = load_tokenizer(out).encode(LOOP_TEXT, add_special_tokens=False)
    assert len(set(ids)) == len(ids) < 63, "each token of the loop must be unique and fit the hidden size"
    bot = 21  # <_bot> in the 12B vocabulary (docs/tokenizers.md)
    config = TelechatConfig(vocab_size=120000, hidden_size=64, n_layer=1, n_head=2, ffn_hidden_size=128,
                            training_seqlen=2048, seq_length=2048, tie_word_embeddings=False,
                            architectures=["TelechatForCausalLM"])
    torch.manual_seed(0)
    model = TelechatForCausalLM(config)
    with torch.no_grad():
        for block in model.transformer.h:
            for linear in (block.self_attention.dense, block.mlp.down_proj):
                linear.weight.zero_()
                linear.bias.zero_()
        emb, head = model.transformer.word_embeddings.weight, model.lm_head.weight
        chain = [bot] + ids
        for i, tok in enumerate(chain):
            emb[tok] = 0
            emb[tok, i] = 1
        for i, tok in enumerate(chain):
            head[ids[i % len(ids)], i] = 10.0  # successor of chain[i]; the last token loops to ids[0]
    model.save_pretrained(out)
    generation = {"do_sample": False, "temperature": 0.3, "top_k": 5, "top_p": 0.85, "repetition_penalty": 1.0,
                  "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3, "user_token_id": 20, "bot_token_id": bot}
    (out / "generation_config.json").write_text(json.dumps(generation), encoding="utf-8")
    return out


@pytest.fixture(scope="session")
def loop_server(loop_model_dir, api_server):
    """The API over :func:`loop_model_dir`."""
    return api_server(loop_model_dir)
