"""telechat.tools.perplexity: chunked loss == the model's own loss; windows and strides count each token once."""

from __future__ import annotations

import math

import torch

from telechat.tools.perplexity import perplexity, window_nll


def _tiny_model():
    from telechat.model.config import TelechatConfig
    from telechat.model.modeling import TelechatForCausalLM

    torch.manual_seed(0)
    cfg = TelechatConfig(vocab_size=97, hidden_size=32, n_layer=2, n_head=2, ffn_hidden_size=64,
                         training_seqlen=64, seq_length=64)
    return TelechatForCausalLM(cfg).eval()


def test_single_window_matches_model_loss():
    """One window: exp(mean shifted cross-entropy) from the model's labels path, for any chunk size."""
    model = _tiny_model()
    ids = torch.randint(0, 97, (40,))
    with torch.no_grad():
        ref = math.exp(model(input_ids=ids[None], labels=ids[None], use_cache=False).loss.item())
    for chunk in (None, 1, 7, 39):
        assert math.isclose(perplexity(model, ids, seq_len=64, chunk=chunk), ref, rel_tol=1e-5)


def test_windows_and_stride():
    """Non-overlapping windows == the mean over per-window losses weighted by scored tokens;
    stride < seq_len scores every token after the first exactly once."""
    model = _tiny_model()
    ids = torch.randint(0, 97, (50,))
    with torch.no_grad():
        nll = [model(input_ids=w[None], labels=w[None], use_cache=False).loss.item() * (len(w) - 1)
               for w in (ids[:20], ids[20:40], ids[40:])]
    expected = math.exp(sum(nll) / (19 + 19 + 9))
    assert math.isclose(perplexity(model, ids, seq_len=20), expected, rel_tol=1e-5)
    # With stride 1 and a window as long as the text, every prediction sees its whole prefix.
    full = perplexity(model, ids, seq_len=50)
    assert math.isclose(perplexity(model, ids, seq_len=50, stride=10), full, rel_tol=1e-5)


def test_window_nll_scores_a_suffix_in_cached_chunks():
    """The one NLL loop: scoring only the last targets of a window, run in KV-cached chunks, equals
    the single pass (what eval-ppl's long windows and the GPTQ report's overlapping windows use)."""
    model = _tiny_model()
    window = torch.randint(0, 97, (50,))
    total, count = window_nll(model, window)
    assert count == 49
    suffix, n = window_nll(model, window, num_scored=20)
    for chunk in (7, 16, 49):
        chunked, m = window_nll(model, window, num_scored=20, prefill_chunk=chunk, logits_chunk=3)
        assert m == n == 20 and math.isclose(chunked, suffix, rel_tol=1e-5)
    assert 0 < suffix < total
