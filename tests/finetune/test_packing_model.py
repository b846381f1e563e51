"""Packing is invisible to the model: a packed batch gives each sample the logits it gets alone."""

from __future__ import annotations

import json

import torch

from jobs.finetune.data import read_jsonl
from jobs.finetune.dataset import Collator, build_rows, encode
from telechat.chat_format import ChatFormat
from telechat.model.loader import load_model
from telechat.tokenizer import load_tokenizer


def test_packed_batch_logits_equal_per_sample_logits(tiny_model_dir, official_sft):
    """Block-diagonal attention + restarting positions: no sample sees another, at any position."""
    tokenizer = load_tokenizer(tiny_model_dir)
    chat = ChatFormat(tokenizer, json.loads((tiny_model_dir / "generation_config.json").read_text(encoding="utf-8")))
    convs = read_jsonl(official_sft["single"])[:4] + read_jsonl(official_sft["multi"])[:4]
    samples = [encode(chat, c.messages, 80)[0] for c in convs]
    rows = build_rows(samples, 200, packing=True)
    assert any(sum(p == 0 for p in r["position_ids"]) > 1 for r in rows), "nothing was packed"
    batch = Collator(tokenizer.pad_token_id)(rows)
    model = load_model(tiny_model_dir, device="cpu", dtype="float32")
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        # The check has teeth: plain positions (one long causal sequence per row) do change logits.
        leaky = model(input_ids=batch["input_ids"], use_cache=False).logits
        assert not torch.allclose(leaky, packed, atol=1e-3)
        for r, row in enumerate(rows):
            pos = row["position_ids"]
            starts = [i for i, p in enumerate(pos) if p == 0]
            for a, b in zip(starts, starts[1:] + [len(pos)]):
                alone = model(input_ids=torch.tensor([row["input_ids"][a:b]]), use_cache=False).logits[0]
                torch.testing.assert_close(packed[r, a:b], alone, atol=1e-5, rtol=1e-5)
