"""Sampler additions of issue 18 on a tiny random model (CPU): log-probabilities, logit_bias, min_p,
min_tokens, frequency/presence penalties, and siblings (n > 1) sharing the prompt's KV blocks."""

from __future__ import annotations

import pytest
import torch

from telechat.engine.core import EngineConfig, LLMEngine
from telechat.engine.sampling import SamplingParams, adjust_logits
from telechat.model.config import TelechatConfig
from telechat.model.modeling import TelechatForCausalLM

VOCAB = 300
PROMPT = [5, 17, 42, 99, 7, 250, 31, 64, 12, 200, 8, 77, 150, 3, 91, 44, 120, 66]


@pytest.fixture(scope="module")
def model() -> TelechatForCausalLM:
    torch.manual_seed(0)
    cfg = TelechatConfig(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4, ffn_hidden_size=128,
                         training_seqlen=48, seq_length=256, initializer_range=0.3)
    return TelechatForCausalLM(cfg).eval()


def run(engine: LLMEngine, prompt: list[int], params: SamplingParams, **kw) -> tuple[list[int], list]:
    """Output ids and logprob entries of one request run to the end."""
    rid = engine.add_request(prompt, params, **kw)
    ids, lps = [], []
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id == rid:
                ids += out.new_token_ids
                lps += out.logprobs or []
    return ids, lps


def full_logits(model, ids: list[int]) -> torch.Tensor:
    """Next-token logits after every position of ``ids`` (one plain forward pass)."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_logprobs_equal_log_softmax_of_a_forward_pass(model, overlap):
    engine = LLMEngine(model, EngineConfig(max_num_seqs=4, overlap=overlap))
    params = SamplingParams(max_tokens=6, temperature=0.9, seed=3, logprobs=5, repetition_penalty=1.3)
    ids, lps = run(engine, PROMPT, params)
    assert len(lps) == len(ids) == 6
    logp = torch.log_softmax(full_logits(model, PROMPT + ids), dim=-1)[len(PROMPT) - 1 :]
    for step, (token, (own, top_ids, top_lps)) in enumerate(zip(ids, lps)):
        ref = logp[step]  # raw: before the repetition penalty and the temperature
        assert own == pytest.approx(ref[token].item(), abs=1e-4)
        want = ref.topk(5)
        assert top_ids == want.indices.tolist()
        assert top_lps == pytest.approx(want.values.tolist(), abs=1e-4)
        assert top_lps == sorted(top_lps, reverse=True)


def test_no_logprobs_unless_asked(model):
    engine = LLMEngine(model, EngineConfig(max_num_seqs=2))
    _, lps = run(engine, PROMPT, SamplingParams(max_tokens=3, temperature=0))
    assert lps == []
    _, lps = run(engine, PROMPT, SamplingParams(max_tokens=3, temperature=0, logprobs=0))
    assert [(len(i), len(v)) for _, i, v in lps] == [(0, 0)] * 3


def test_logit_bias_forces_and_bans(model):
    engine = LLMEngine(model, EngineConfig(max_num_seqs=2))
    greedy, _ = run(engine, PROMPT, SamplingParams(max_tokens=4, temperature=0))
    forced, _ = run(engine, PROMPT, SamplingParams(max_tokens=4, temperature=0, logit_bias={123: 100}))
    assert forced == [123] * 4
    banned, _ = run(engine, PROMPT, SamplingParams(max_tokens=4, temperature=0, logit_bias={greedy[0]: -100}))
    assert banned[0] != greedy[0]
    sampled, _ = run(engine, PROMPT, SamplingParams(max_tokens=8, temperature=1.0, seed=1,
                                                    logit_bias={t: -100 for t in range(VOCAB) if t != 9}))
    assert sampled == [9] * 8


def test_min_tokens_rules_out_stop_tokens(model):
    engine = LLMEngine(model, EngineConfig(max_num_seqs=2))
    greedy, _ = run(engine, PROMPT, SamplingParams(max_tokens=8, temperature=0))
    stop = greedy[1]
    ids, _ = run(engine, PROMPT, SamplingParams(max_tokens=8, temperature=0, stop_token_ids=[stop]))
    assert ids == greedy[:2]  # stops at the second token
    ids, _ = run(engine, PROMPT, SamplingParams(max_tokens=8, temperature=0, stop_token_ids=[stop], min_tokens=4))
    assert len(ids) >= 4 and stop not in ids[:3]


def test_min_p_keeps_only_near_top_tokens(model):
    engine = LLMEngine(model, EngineConfig(max_num_seqs=2))
    params = SamplingParams(max_tokens=1, temperature=1.0, min_p=0.5, logprobs=0)
    probs = torch.softmax(full_logits(model, PROMPT)[-1], dim=-1)
    allowed = set(torch.nonzero(probs >= 0.5 * probs.max()).flatten().tolist())
    seen = {run(engine, PROMPT, SamplingParams(**{**params.__dict__, "seed": s}))[0][0] for s in range(40)}
    assert seen <= allowed
    wide = {run(engine, PROMPT, SamplingParams(max_tokens=1, temperature=1.0, seed=s))[0][0] for s in range(40)}
    assert not wide <= allowed  # without min_p the same seeds reach other tokens: the filter did it


def test_frequency_and_presence_penalties_are_additive():
    logits = torch.zeros(2, 6)
    counts = torch.tensor([[0, 1, 3, 0, 0, 0], [2, 0, 0, 0, 0, 0]], dtype=torch.int32)
    params = [SamplingParams(frequency_penalty=0.5, presence_penalty=0.25), SamplingParams()]
    out = adjust_logits(logits, params, [0, 0], counts)
    assert out[0].tolist() == [0, -0.75, -1.75, 0, 0, 0]
    assert out[1].tolist() == [0] * 6


def test_frequency_penalty_discourages_repeats(model):
    engine = LLMEngine(model, EngineConfig(max_num_seqs=2))
    plain, _ = run(engine, PROMPT, SamplingParams(max_tokens=30, temperature=0))
    assert len(set(plain)) < len(plain)  # the greedy reply repeats tokens
    penalised, _ = run(engine, PROMPT, SamplingParams(max_tokens=30, temperature=0, frequency_penalty=2.0,
                                                      presence_penalty=2.0))
    assert len(set(penalised)) > len(set(plain))


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_siblings_share_the_prompt_blocks(model, overlap):
    """A sibling (``after``) is admitted once the first choice has its first token: it finds the prompt's
    full blocks in the prefix cache instead of computing them again; seeds keep each choice reproducible."""
    engine = LLMEngine(model, EngineConfig(max_num_seqs=4, block_size=4, overlap=overlap))
    params = [SamplingParams(max_tokens=6, temperature=1.0, seed=s) for s in (10, 11)]
    first = engine.add_request(PROMPT, params[0], "c0")
    second = engine.add_request(PROMPT, params[1], "c1", after=first)
    outs: dict[str, list[int]] = {first: [], second: []}
    cached = {}
    while engine.has_unfinished():
        for out in engine.step():
            outs[out.request_id] += out.new_token_ids
            cached[out.request_id] = out.num_cached_tokens
    assert cached[first] == 0
    assert cached[second] == (len(PROMPT) - 1) // 4 * 4  # every full block of the prompt but the last token's
    alone = [run(LLMEngine(model, EngineConfig(max_num_seqs=4, block_size=4)), PROMPT, p)[0] for p in params]
    assert [outs[first], outs[second]] == alone
    assert alone[0] != alone[1]


def test_bad_values_are_refused():
    for kw in ({"min_p": 1.5}, {"min_tokens": 9, "max_tokens": 8}, {"frequency_penalty": 3},
               {"presence_penalty": float("nan")}, {"logit_bias": {5: 101}}, {"logit_bias": {-1: 1}},
               {"logprobs": 21}, {"logprobs": -1}):
        with pytest.raises(ValueError):
            SamplingParams(**kw)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_with_graphs_and_overlap(model):
    """The same on the GPU: decode steps replay CUDA graphs, tokens and log-probabilities are read one
    step later; batch-mates that ask for nothing are unchanged by those that do."""
    gpu = TelechatForCausalLM(model.config).eval()
    gpu.load_state_dict(model.state_dict())
    gpu = gpu.cuda()
    engine = LLMEngine(gpu, EngineConfig(max_num_seqs=4, overlap=True, cuda_graphs=True))
    plain = SamplingParams(max_tokens=8, temperature=0)
    ids, lps = run(engine, PROMPT, SamplingParams(max_tokens=8, temperature=0, logprobs=3, logit_bias={7: 2.0},
                                                  frequency_penalty=0.5, min_tokens=2))
    logp = torch.log_softmax(full_logits(model, PROMPT + ids), dim=-1)[len(PROMPT) - 1 :]
    for step, (token, (own, top_ids, _)) in enumerate(zip(ids, lps)):
        assert own == pytest.approx(logp[step, token].item(), abs=1e-3)
        assert top_ids == logp[step].topk(3).indices.tolist()
    alone = run(engine, PROMPT, plain)[0]
    a = engine.add_request(PROMPT, plain, "plain")
    engine.add_request(PROMPT, SamplingParams(max_tokens=8, temperature=1.0, seed=1, logprobs=5,
                                              logit_bias={3: 50}, presence_penalty=1.0), "busy")
    got: list[int] = []
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id == a:
                got += out.new_token_ids
    assert got == alone
