"""Cached decoding past ``training_seqlen`` equals one forward pass with RoPE fixed at the prompt length.

The official code crashes there (golden README: the decode table is only ``training_seqlen`` rows
long); our rule (docs/model.md, RoPE) fixes the RoPE parameters per sequence at prefill instead.
"""

from __future__ import annotations

import pytest
import torch

from telechat.model.loader import load_model
from telechat.engine.core import EngineConfig, LLMEngine
from telechat.engine.sampling import SamplingParams
from tests.long_context.conftest import GOLDEN_7B

NEW_TOKENS = 40
PROMPTS = {"past_training": 100, "crosses_training": 50}
"""Prompt lengths around the golden model's training_seqlen of 64: decoding runs from 100 to 139,
and from 50 across 64 to 89."""


@pytest.fixture(scope="module")
def model():
    return load_model(GOLDEN_7B, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def prompts(golden_refs) -> dict[str, list[int]]:
    ids = golden_refs["input_ids_L200"].tolist()
    return {name: ids[:n] for name, n in PROMPTS.items()}


@pytest.fixture(scope="module")
def hf_generations(model, prompts):
    """transformers ``generate`` (DynamicCache) greedy tokens and per-step logits."""
    out = {}
    for name, prompt in prompts.items():
        ids = torch.tensor([prompt])
        res = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW_TOKENS,
                             eos_token_id=None, repetition_penalty=1.0, output_logits=True,
                             return_dict_in_generate=True)
        out[name] = (res.sequences[0, len(prompt):].tolist(), torch.stack(res.logits, 1)[0])
    return out


def single_pass_logits(model, prompt: list[int], new: list[int], rope_length: int | None) -> torch.Tensor:
    """Logits at the positions that predicted ``new``, from one uncached forward of prompt + new."""
    ids = torch.tensor([prompt + new[:-1]])
    with torch.inference_mode():
        logits = model(ids, use_cache=False, rope_length=rope_length).logits[0]
    return logits[len(prompt) - 1 :]


@pytest.mark.parametrize("name", sorted(PROMPTS))
def test_generate_equals_single_pass_with_rope_fixed_at_prompt(model, prompts, hf_generations, name):
    """Every decode step's logits equal the single pass at that position with rope_length = prompt length."""
    prompt = prompts[name]
    tokens, step_logits = hf_generations[name]
    assert len(prompt) + NEW_TOKENS > model.config.training_seqlen
    reference = single_pass_logits(model, prompt, tokens, rope_length=len(prompt))
    torch.testing.assert_close(step_logits, reference, rtol=1e-4, atol=1e-5)
    assert reference.argmax(-1).tolist() == tokens


def test_unpinned_single_pass_differs_past_training_length(model, prompts, hf_generations):
    """Control: letting the single pass pick RoPE from its own length (139 tokens) changes the logits,
    so the equality above really depends on fixing RoPE at the prompt."""
    prompt = prompts["past_training"]
    tokens, step_logits = hf_generations["past_training"]
    unpinned = single_pass_logits(model, prompt, tokens, rope_length=None)
    assert (unpinned - step_logits).abs().max() > 1e-3


def test_engine_decodes_past_training_length_like_generate(model, prompts, hf_generations):
    """The paged-KV engine (chunked prefill of 24 tokens, both prompts in one batch) emits the same
    greedy tokens as generate and as the single-pass reference."""
    engine = LLMEngine(model, EngineConfig(max_num_seqs=2, max_model_len=256, max_num_batched_tokens=24,
                                           kv_cache_memory=4 << 20))
    names = sorted(PROMPTS)
    outputs = engine.generate([prompts[n] for n in names],
                              SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True))
    for name, out in zip(names, outputs):
        assert out == hf_generations[name][0], name
