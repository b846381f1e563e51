"""The chunked causal-LM loss equals transformers' loss, value and gradients, with and without
``num_items_in_batch``, for a tied and an untied head."""

from __future__ import annotations

import pytest
import torch

from telechat.model.config import TelechatConfig
from telechat.model.modeling import TelechatForCausalLM


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("num_items", [None, 37])
def test_chunked_loss_matches_full_logits(tied, num_items):
    torch.manual_seed(0)
    cfg = TelechatConfig(vocab_size=300, hidden_size=32, n_layer=2, n_head=4, ffn_hidden_size=64,
                         tie_word_embeddings=tied, hidden_dropout=0.0, attention_dropout=0.0)
    model = TelechatForCausalLM(cfg).train()
    ids = torch.randint(0, 300, (3, 21))
    labels = ids.clone()
    labels[0, :5] = -100  # a masked prompt
    extra = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}

    def run(chunk):
        model.zero_grad(set_to_none=True)
        model.loss_chunk_tokens = chunk
        out = model(input_ids=ids, labels=labels, **extra)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    full, full_grads = run(None)
    chunked, chunked_grads = run(8)  # 63 tokens in 8 chunks, the last one short
    assert chunked.logits is None and full.logits is not None
    torch.testing.assert_close(chunked.loss, full.loss, rtol=1e-5, atol=1e-6)
    assert full_grads.keys() == chunked_grads.keys()
    for name, grad in full_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    model.eval()
    assert model(input_ids=ids, labels=labels).logits is not None  # evaluation keeps the logits
