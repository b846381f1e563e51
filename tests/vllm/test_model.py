"""vLLM with the plugin reproduces our native model: logits, greedy tokens, tokenizer ids (7B and 12B layouts)."""

from __future__ import annotations

import pytest

from tests.vllm.conftest import MAX_MODEL_LEN, PROMPTS, Native

NEW_TOKENS = 8
TOP = 20


@pytest.fixture(scope="module", params=["7b", "12b"])
def pair(request, llm_factory):
    """(native model, vLLM engine) on the same tiny checkpoint of one layout."""
    folder = request.getfixturevalue(f"tiny_{request.param}")
    return Native(folder), llm_factory(folder, max_logprobs=TOP)


def _run(llm, ids_list: list[list[int]]):
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, logprobs=TOP,
                            prompt_logprobs=TOP)
    return llm.generate([{"prompt_token_ids": ids} for ids in ids_list], params, use_tqdm=False)


def test_prompts_are_in_the_exact_rope_range(pair):
    """The comparison lengths stay within max_model_len <= training_seqlen, where the per-engine RoPE is exact."""
    native, llm = pair
    config = llm.llm_engine.model_config.hf_config
    assert llm.llm_engine.model_config.max_model_len == MAX_MODEL_LEN <= config.training_seqlen
    assert max(len(native.encode(p)) for p in PROMPTS) + NEW_TOKENS <= MAX_MODEL_LEN
    assert max(len(native.encode(p)) for p in PROMPTS) > 100


def test_logits_and_greedy_tokens_match_native(pair):
    """Prompt and decode log-probabilities (top 20 per position) equal the native ones to ~1e-5; greedy tokens equal."""
    native, llm = pair
    prompts = [native.encode(p) for p in PROMPTS]
    for ids, out in zip(prompts, _run(llm, prompts)):
        tokens = list(out.outputs[0].token_ids)
        assert tokens == native.greedy(ids, NEW_TOKENS)
        reference = native.logprobs(ids + tokens)  # row i: next-token distribution after ids[: i + 1]
        served = list(out.prompt_logprobs[1:]) + list(out.outputs[0].logprobs)  # one dict per position >= 1
        assert len(served) == len(ids) + len(tokens) - 1
        worst = 0.0
        for row, entries in enumerate(served):
            for token, logprob in entries.items():
                worst = max(worst, abs(logprob.logprob - reference[row, token].item()))
            best = max(entries.values(), key=lambda lp: lp.logprob)
            assert best.rank == 1 and reference[row].max().item() == pytest.approx(best.logprob, abs=1e-4)
        assert worst < 1e-4, f"largest |logprob difference| {worst:.2e}"


def test_vllm_tokenizer_gives_our_ids(pair):
    """vLLM's AutoTokenizer path (no trust_remote_code) yields our tokenizer's ids and decodes."""
    native, llm = pair
    served = llm.get_tokenizer()
    texts = [*PROMPTS, "<_user>你好<_bot>我是 TeleChat。<_end>", "数字 12345 和 emoji 😀"]
    for text in texts:
        ids = native.encode(text)
        assert served.encode(text, add_special_tokens=False) == ids
        assert served.decode(ids) == native.tokenizer.decode(ids)
