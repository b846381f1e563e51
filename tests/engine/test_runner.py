"""ModelRunner driven directly by hand-built SchedulerOutputs on a tiny random model (CPU).

Every invariant is checked against transformers ``generate()`` / ``forward`` on an unfused copy of
the model, so the runner's fused projections, paged cache, per-token RoPE and device-side
sampling are all under test.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from telechat.engine.block_pool import BlockPool
from telechat.engine import kv_cache
from telechat.engine.kv_cache import PagedKVCache
from telechat.engine.request import Request
from telechat.engine.runner import ModelRunner
from telechat.engine.sampling import SamplingParams, draw, sample_on_device
from telechat.engine.scheduler_output import ScheduledChunk, SchedulerOutput
from telechat.model.config import TelechatConfig
from telechat.model.modeling import TelechatForCausalLM

VOCAB = 400
GREEDY = SamplingParams(max_tokens=64, temperature=0)


@pytest.fixture(scope="module")
def model() -> TelechatForCausalLM:
    torch.manual_seed(0)
    # A large init spreads the logits, so greedy ties (which batching could flip) do not occur;
    # training_seqlen 24 puts most prompts past it (NTK base and mscale per sequence).
    cfg = TelechatConfig(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4, num_key_value_heads=2,
                         ffn_hidden_size=128, training_seqlen=24, seq_length=512, initializer_range=0.3)
    return TelechatForCausalLM(cfg).eval()


def prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, VOCAB, (n,), generator=g).tolist()


def hf_generate(model, ids: list[int], n: int, **kw) -> tuple[list[int], torch.Tensor]:
    """transformers greedy tokens and the raw logits of every step."""
    x = torch.tensor([ids], device=model.device)
    out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n, eos_token_id=None,
                         output_logits=True, return_dict_in_generate=True, **kw)
    return out.sequences[0, len(ids):].tolist(), torch.stack(out.logits, 1)[0].float()


class Steps:
    """A ModelRunner (over a fused copy of ``model``) and its own paged cache, with the bookkeeping a
    scheduler would do by hand."""

    def __init__(self, model, *, block_size: int = 4, max_num_seqs: int = 4, cuda_graphs: bool | None = None,
                 max_model_len: int = 256):
        cfg = model.config
        self.model = model
        self.max_model_len = max_model_len
        self.cache = PagedKVCache(num_layers=cfg.n_layer, num_blocks=300, block_size=block_size,
                                  n_kv=cfg.num_key_value_heads, head_dim=cfg.head_dim, dtype=model.dtype,
                                  device=model.device)
        self.blocks = BlockPool(300, block_size, enable_prefix_caching=False)
        self.runner = ModelRunner(copy.deepcopy(model), self.cache, max_num_seqs=max_num_seqs,
                                  max_model_len=max_model_len, num_rows=8, cuda_graphs=cuda_graphs)
        self.free_rows = list(range(8))

    def request(self, ids: list[int], params: SamplingParams = GREEDY, shared_blocks: list[int] = ()) -> Request:
        req = Request(f"r{len(self.free_rows)}", list(ids), params, max_len=self.max_model_len,
                      rope=self.model.rope_params(len(ids)), block_ids=list(shared_blocks))
        req.row = self.free_rows.pop(0)
        return req

    def chunk(self, req: Request, start: int, end: int, *, sample: bool = True,
              from_previous: bool = False) -> ScheduledChunk:
        need = math.ceil(end / self.cache.block_size) - len(req.block_ids)
        if need > 0:
            req.block_ids += self.blocks.allocate(need)
        ids = [] if from_previous else req.known_ids(start, end)
        return ScheduledChunk(req, start, end - start, ids, from_previous=from_previous, sample=sample)

    def run(self, decodes=(), prefills=(), new=()) -> list[int | None]:
        """One step, read at once; known tokens are appended to their requests."""
        result = self.runner.execute(SchedulerOutput(decodes=list(decodes), prefills=list(prefills),
                                                     new_rows=list(new)))
        sampled = [c for c in [*decodes, *prefills] if c.sample]
        tokens = result.tokens()
        for c, tok in zip(sampled, tokens):
            if tok is not None:
                c.request.output_ids.append(tok)
        self.last_logits = result.logits
        return tokens

    def decode(self, req: Request) -> ScheduledChunk:
        """The next one-token decode of ``req`` with its last known token as input."""
        n = req.num_known_tokens
        return self.chunk(req, n - 1, n)


def test_prefill_then_decodes_match_generate(model):
    """Prefill + decodes, with a request admitted while another decodes (mixed steps), give
    generate()'s greedy tokens and its logits at every step."""
    s = Steps(model)
    a, b = s.request(prompt(30, 1)), s.request(prompt(9, 2))
    s.run(prefills=[s.chunk(a, 0, 30)], new=[a])
    logits_a = [s.last_logits[0]]
    s.run(decodes=[s.decode(a)], prefills=[s.chunk(b, 0, 9)], new=[b])
    logits_a.append(s.last_logits[0])
    logits_b = [s.last_logits[1]]
    for _ in range(10):
        s.run(decodes=[s.decode(a), s.decode(b)])
        logits_a.append(s.last_logits[0])
        logits_b.append(s.last_logits[1])
    for req, logits in ((a, logits_a), (b, logits_b)):
        ref_tokens, ref_logits = hf_generate(model, req.prompt_ids, len(req.output_ids))
        assert req.output_ids == ref_tokens
        torch.testing.assert_close(torch.stack(logits), ref_logits, rtol=1e-4, atol=1e-4)


def test_from_previous_decodes_read_the_previous_steps_device_tokens(model):
    """Step N+1 is queued before step N's tokens are read (overlap): its decodes take their inputs
    from step N's sampled ids on the device and reproduce generate()."""
    s = Steps(model)
    a, b = s.request(prompt(20, 3)), s.request(prompt(33, 4))
    pending = s.runner.execute(SchedulerOutput(prefills=[s.chunk(a, 0, 20), s.chunk(b, 0, 33)], new_rows=[a, b]))
    tokens = {a: [], b: []}
    for step in range(8):
        # Each decode's input is the token sampled in the previous step, at position prompt + tokens read.
        decodes = [s.chunk(r, len(r.prompt_ids) + len(tokens[r]), len(r.prompt_ids) + len(tokens[r]) + 1,
                           from_previous=True) for r in (a, b)]
        nxt = s.runner.execute(SchedulerOutput(decodes=decodes))
        for r, tok in zip((a, b), pending.tokens()):
            tokens[r].append(tok)
        pending = nxt
    for r, tok in zip((a, b), pending.tokens()):
        tokens[r].append(tok)
    for r in (a, b):
        assert tokens[r] == hf_generate(model, r.prompt_ids, 9)[0]


def test_same_length_prompts_batched_in_one_step_match_generate(model):
    """Fresh prompts of equal length are attended in one batched call per layer, whether their rows are
    consecutive (a, b) or not (c after d): every prompt's logits still equal generate()'s."""
    s = Steps(model)
    a, b, d, c = (s.request(prompt(n, seed)) for n, seed in ((11, 21), (11, 22), (6, 23), (11, 24)))
    s.run(prefills=[s.chunk(r, 0, len(r.prompt_ids)) for r in (a, b, d, c)], new=[a, b, d, c])
    for i, r in enumerate((a, b, d, c)):
        torch.testing.assert_close(s.last_logits[i], hf_generate(model, r.prompt_ids, 1)[1][0], rtol=1e-4, atol=1e-4)


def test_failed_row_is_fed_as_zero_and_fails_alone(model):
    """A row whose sampling fails returns None; the next step still feeds its placeholder (-1 clamped
    to 0) without error, and its batch-mate's tokens are untouched."""
    s = Steps(model)
    poisoned = SamplingParams(max_tokens=8, temperature=1e-300)  # logits / 1e-300 = inf → NaN probabilities
    good, bad = s.request(prompt(12, 5)), s.request(prompt(15, 6), poisoned)
    first = s.runner.execute(SchedulerOutput(prefills=[s.chunk(good, 0, 12), s.chunk(bad, 0, 15)],
                                             new_rows=[good, bad]))
    second = s.runner.execute(SchedulerOutput(decodes=[s.chunk(good, 12, 13, from_previous=True),
                                                       s.chunk(bad, 15, 16, from_previous=True)]))
    t1, t2 = first.tokens(), second.tokens()
    assert t1[1] is None and t2[1] is None
    assert [t1[0], t2[0]] == hf_generate(model, good.prompt_ids, 2)[0]


@pytest.mark.parametrize("block_size", [4, 16])
def test_chunked_prefill_equals_one_shot(model, block_size):
    """A prompt prefilled in 7-token chunks (later chunks read their context from the cache) gives the
    logits and continuation of one-shot prefill."""
    ids = prompt(45, 7)
    one = Steps(model, block_size=block_size)
    r1 = one.request(ids)
    one.run(prefills=[one.chunk(r1, 0, 45)], new=[r1])
    ref = one.last_logits[0]
    chunked = Steps(model, block_size=block_size)
    r2 = chunked.request(ids)
    for start in range(0, 45, 7):
        end = min(start + 7, 45)
        chunked.run(prefills=[chunked.chunk(r2, start, end, sample=end == 45)], new=[r2] if start == 0 else [])
    torch.testing.assert_close(chunked.last_logits[0], ref, rtol=1e-4, atol=1e-4)
    for steps, req in ((one, r1), (chunked, r2)):
        for _ in range(5):
            steps.run(decodes=[steps.decode(req)])
    assert r1.output_ids == r2.output_ids


def test_prefill_over_cached_prefix_equals_fresh(model):
    """A request that shares another's first blocks (a prefix-cache hit) prefills only the rest, from
    position 32 over the cached context, and gets the logits and tokens of a fresh run."""
    s = Steps(model, block_size=8)
    base = prompt(40, 8)
    first = s.request(base)
    s.run(prefills=[s.chunk(first, 0, 40)], new=[first])
    ids = base[:32] + prompt(8, 9)  # as long as `base`: the same RoPE, as the prefix cache's salt demands
    hit = s.request(ids, shared_blocks=first.block_ids[:4])  # 4 full blocks = positions [0, 32)
    s.run(decodes=[s.decode(first)], prefills=[s.chunk(hit, 32, len(ids))], new=[hit])
    for _ in range(6):
        s.run(decodes=[s.decode(first), s.decode(hit)])
    ref_tokens, ref_logits = hf_generate(model, ids, len(hit.output_ids))
    assert hit.output_ids == ref_tokens
    torch.testing.assert_close(s.last_logits[1], ref_logits[-1], rtol=1e-4, atol=1e-4)
    assert first.output_ids == hf_generate(model, base, len(first.output_ids))[0]


@pytest.mark.parametrize("group_tokens", [None, 80], ids=["one-call", "split"])
def test_cached_context_chunks_of_one_span_batched_in_one_step_match_generate(model, monkeypatch, group_tokens):
    """Chunks over cached context with the same (start, end) are attended in batched calls per layer (split
    at CONTEXT_GROUP_TOKENS: 80 makes (a, b) one call and c another), whether their rows are consecutive
    (a, b, c) or not (d, e around a fresh prompt f); each chunk reads its own context: every prompt's
    logits still equal generate()'s."""
    if group_tokens is not None:
        monkeypatch.setattr(kv_cache, "CONTEXT_GROUP_TOKENS", group_tokens)
    s = Steps(model, block_size=8)
    base = prompt(40, 8)
    first = s.request(base)
    s.run(prefills=[s.chunk(first, 0, 40)], new=[first])
    # As long as `base` (the same RoPE, as the prefix cache's salt demands), sharing 4 or 3 of its blocks.
    a, b, c = (s.request(base[:32] + prompt(8, seed), shared_blocks=first.block_ids[:4]) for seed in (31, 32, 36))
    d, e = (s.request(base[:24] + prompt(16, seed), shared_blocks=first.block_ids[:3]) for seed in (33, 34))
    f = s.request(prompt(40, 35))
    order, starts = (a, b, c, d, f, e), (32, 32, 32, 24, 0, 24)
    s.run(prefills=[s.chunk(r, start, 40) for r, start in zip(order, starts)], new=list(order))
    for i, r in enumerate(order):
        torch.testing.assert_close(s.last_logits[i], hf_generate(model, r.prompt_ids, 1)[1][0], rtol=1e-4, atol=1e-4)


def test_padded_decode_buckets_change_nothing(model):
    """Decode batches padded to a graph bucket (padding writes to the scratch block) give the same
    tokens; on CPU the bucketed pass runs eagerly."""
    s = Steps(model, max_num_seqs=8)
    s.runner.graphs = {}  # bucketed shapes as on CUDA, without capture
    reqs = [s.request(prompt(n, 10 + n)) for n in (5, 17, 26)]
    s.run(prefills=[s.chunk(r, 0, len(r.prompt_ids)) for r in reqs], new=reqs)
    for _ in range(6):
        s.run(decodes=[s.decode(r) for r in reqs])  # 3 decodes → bucket 4
    for r in reqs:
        assert r.output_ids == hf_generate(model, r.prompt_ids, 7)[0]


def test_repetition_penalty_matches_generate(model):
    """Greedy with a repetition penalty (presence from the prompt, then updated on the device from each
    sampled token) equals generate(repetition_penalty=...)."""
    s = Steps(model)
    penalised = SamplingParams(max_tokens=16, temperature=0, repetition_penalty=3.0)
    a, b = s.request(prompt(14, 11), penalised), s.request(prompt(14, 11))
    s.run(prefills=[s.chunk(a, 0, 14), s.chunk(b, 0, 14)], new=[a, b])
    for _ in range(11):
        s.run(decodes=[s.decode(a), s.decode(b)])
    assert a.output_ids == hf_generate(model, a.prompt_ids, 12, repetition_penalty=3.0)[0]
    assert b.output_ids == hf_generate(model, b.prompt_ids, 12)[0]
    assert a.output_ids != b.output_ids


def _sampled_run(model, seeds_and_mates: list[SamplingParams], steps: int = 10) -> list[list[int]]:
    s = Steps(model, max_num_seqs=4)
    reqs = [s.request(prompt(10, 20 + i), p) for i, p in enumerate(seeds_and_mates)]
    s.run(prefills=[s.chunk(r, 0, 10) for r in reqs], new=reqs)
    for _ in range(steps):
        s.run(decodes=[s.decode(r) for r in reqs])
    return [r.output_ids for r in reqs]


def test_seeded_rows_reproduce_whatever_their_batch_mates(model):
    """Same seed + prompt = same tokens, alone or beside unseeded sampled rows; another seed differs."""
    seeded = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, seed=7)
    alone = _sampled_run(model, [seeded])[0]
    mates = SamplingParams(temperature=0.9)
    assert _sampled_run(model, [seeded, mates, mates])[0] == alone
    assert _sampled_run(model, [SamplingParams(temperature=1.0, top_k=50, top_p=0.9, seed=8)])[0] != alone


# ---------------------------------------------------------------------------- sampling on the device

def test_draw_equals_torch_multinomial():
    """draw() consumes the generator like torch.multinomial(probs, 1) and picks the same indices."""
    probs = torch.softmax(torch.randn(6, 50) * 3, dim=-1)
    ours = draw(probs, torch.Generator().manual_seed(3))
    ref = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(3)).squeeze(1)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("poison", [
    SamplingParams(temperature=1e-300),  # logits / 1e-300 = inf → NaN probabilities
    SamplingParams(temperature=1.0, repetition_penalty=5e-324),  # logit / 5e-324 = inf
    SamplingParams(temperature=0, repetition_penalty=5e-324),  # the same, greedy
], ids=["tiny-temperature", "tiny-penalty-sampled", "tiny-penalty-greedy"])
def test_poisoned_row_fails_alone(poison):
    """A row whose numbers go bad is flagged failed; its batch-mates (greedy, penalised, seeded) get
    what they get without it."""
    logits = torch.randn(4, 60) * 4
    mates = [SamplingParams(temperature=0), SamplingParams(temperature=0, repetition_penalty=1.5),
             SamplingParams(temperature=0.8, seed=3)]
    presence = torch.zeros(4, 60, dtype=torch.bool)
    presence[:, :30] = True
    gens = lambda: [None, None, torch.Generator().manual_seed(3)]  # noqa: E731
    clean, clean_failed = sample_on_device(logits[:3], mates, gens(), presence[:3], torch.Generator().manual_seed(1))
    order = [0, 3, 1, 2]  # the poisoned row sits between the others
    g = gens()
    tokens, failed = sample_on_device(logits[order], [mates[0], poison, mates[1], mates[2]], [g[0], None, g[1], g[2]],
                                      presence[order], torch.Generator().manual_seed(1))
    assert failed.tolist() == [False, True, False, False] and not clean_failed.any()
    assert tokens[[0, 2, 3]].tolist() == clean.tolist()


def test_extreme_but_valid_values_sample_normally():
    """top_p that rounds to 0 keeps the most likely token (= greedy); top_k beyond the vocabulary keeps all."""
    logits = torch.randn(3, 80) * 2
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    tiny_p, _ = sample_on_device(logits, [SamplingParams(temperature=1.0, top_p=5e-324)] * 3, [None] * 3,
                                 default_generator=gen())
    assert tiny_p.tolist() == logits.argmax(-1).tolist()
    every, failed = sample_on_device(logits, [SamplingParams(temperature=0.8, top_k=10**20)] * 3, [None] * 3,
                                     default_generator=gen())
    plain, _ = sample_on_device(logits, [SamplingParams(temperature=0.8)] * 3, [None] * 3, default_generator=gen())
    assert every.tolist() == plain.tolist() and not failed.any()
