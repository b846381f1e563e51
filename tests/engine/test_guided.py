"""Grammar-constrained decoding in the engine (CPU): the masked sampler on a tiny random model, and
the demo model (real byte-level BPE tokenizer, real forward passes) answering JSON schemas, regular
expressions and choices, with and without host/device overlap, batched with free requests,
preempted, and refused alone when its grammar is bad."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from telechat.chat_format import ChatFormat
from telechat.engine.core import EngineConfig, LLMEngine
from telechat.engine.guided import (
    GrammarCompiler,
    GrammarError,
    GrammarSpec,
    allowed_tokens,
    bound_json_schema,
    check_grammar,
    json_bounds,
)
from telechat.engine.kv_cache import PagedKVCache
from telechat.engine.sampling import SamplingParams, sample_on_device
from telechat.model.config import TelechatConfig
from telechat.model.modeling import TelechatForCausalLM

PERSON = {"type": "object", "properties": {
    "name": {"type": "string"},
    "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "role": {"enum": ["admin", "user", "guest"]},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
    "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string",
                                                                                   "pattern": "^[0-9]{5}$"}},
                "required": ["city", "zip"]},
}, "required": ["name", "age", "role", "tags", "address"]}
MAX_TOKENS = 400


# ---------------------------------------------------------------------------------------------- masked sampler

def test_masked_sampler_keeps_rows_inside_their_mask_and_leaves_free_rows_alone():
    """Greedy and sampled rows only take allowed tokens; rows with a full mask draw exactly what they
    draw without any mask (same generator state)."""
    torch.manual_seed(0)
    cfg = TelechatConfig(vocab_size=200, hidden_size=32, n_layer=1, n_head=2, ffn_hidden_size=64,
                         training_seqlen=32, seq_length=64)
    model = TelechatForCausalLM(cfg).eval()
    with torch.no_grad():
        logits = model(torch.randint(0, 200, (6, 5))).logits[:, -1].float()
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=50),
              SamplingParams(temperature=0), SamplingParams(temperature=1.0), SamplingParams(temperature=1.0, top_p=0.9)]
    rng = torch.Generator().manual_seed(1)
    allowed = torch.rand(6, 200, generator=rng) < 0.1
    allowed[3:] = True  # free rows
    # the bitmask packing the engine sends: bit t % 32 of word t // 32
    words = torch.zeros(6, 7, dtype=torch.int64)
    for r, t in allowed.nonzero().tolist():
        words[r, t // 32] |= 1 << (t % 32)
    packed = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    assert torch.equal(allowed_tokens(packed, 200), allowed)
    for seed in range(20):
        masked, failed = sample_on_device(logits, params, [None] * 6, default_generator=torch.Generator().manual_seed(seed),
                                          allowed=allowed)
        free, _ = sample_on_device(logits, params, [None] * 6, default_generator=torch.Generator().manual_seed(seed))
        assert not failed.any()
        assert all(allowed[i, t] for i, t in enumerate(masked.tolist()))
        assert masked[3:].tolist() == free[3:].tolist()
    assert masked[0] == logits[0].masked_fill(~allowed[0], float("-inf")).argmax()


def test_bounds_only_narrow_a_schema():
    """The bounded schema adds bounds where none are set and keeps the schema's own."""
    bounded = bound_json_schema(PERSON, *json_bounds(64))
    props = bounded["properties"]
    assert props["name"]["maxLength"] == 8 and props["address"]["properties"]["city"]["maxLength"] == 8
    assert props["tags"]["maxItems"] == 3 and props["tags"]["items"]["maxLength"] == 8
    assert props["age"] == PERSON["properties"]["age"] and "maxLength" not in props["address"]["properties"]["zip"]
    assert "maxLength" not in PERSON["properties"]["name"]  # the caller's schema is left as it was


# ---------------------------------------------------------------------------------------------- demo model

@pytest.fixture(scope="module")
def demo(demo_model_dir):
    from telechat.model.checkpoint import inspect_checkpoint
    from telechat.model.loader import load_model
    from telechat.tokenizer import load_tokenizer

    info = inspect_checkpoint(demo_model_dir, need_tokenizer=True)
    model = load_model(info, device="cpu", dtype="float32")
    tokenizer = load_tokenizer(demo_model_dir)
    chat = ChatFormat(tokenizer, info.generation)
    compiler = GrammarCompiler.from_path(str(demo_model_dir), model.config.vocab_size)
    return model, tokenizer, chat, compiler


def prompt(chat: ChatFormat, text: str) -> list[int]:
    return chat.encode_prompt([{"role": "user", "content": text}])


def run(engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams]) -> list[tuple[list[int], str]]:
    """(output ids without the stop token, finish reason) of each request."""
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    tokens = {i: [] for i in ids}
    reasons = {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
            if out.finished:
                reasons[out.request_id] = out.finish_reason
    result = []
    for i, sp in zip(ids, params):
        t = tokens[i]
        if reasons[i] == "stop" and t and t[-1] in sp.stop_token_ids:
            t = t[:-1]
        result.append((t, reasons[i]))
    return result


def schema_params(chat: ChatFormat, schema: dict, **kw) -> SamplingParams:
    spec = GrammarSpec("json_schema", json.dumps(bound_json_schema(schema, *json_bounds(MAX_TOKENS))))
    return SamplingParams(max_tokens=MAX_TOKENS, stop_token_ids=chat.stop_token_ids, guided=spec, **kw)


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_constrained_rows_validate_and_free_rows_are_unchanged(demo, overlap):
    """A batch of JSON-schema rows (greedy and sampled) and free greedy rows: every constrained reply
    validates and ends with "stop"; the free rows' ids equal those of a run without constrained rows."""
    model, tokenizer, chat, compiler = demo
    questions = ["你好", "介绍一下你自己", "What is TeleChat?", "写一首诗"]
    free = SamplingParams(max_tokens=60, temperature=0, stop_token_ids=chat.stop_token_ids)
    alone = run(LLMEngine(model, EngineConfig(max_num_seqs=8, overlap=overlap)),
                [prompt(chat, q) for q in questions], [free] * 4)
    constrained = [schema_params(chat, PERSON, temperature=t, seed=s) for t, s in ((0, None), (1.0, 1), (0.8, 2), (1.0, 3))]
    engine = LLMEngine(model, EngineConfig(max_num_seqs=8, overlap=overlap), grammars=compiler)
    mixed = run(engine, [prompt(chat, q) for q in questions] * 2, [free] * 4 + constrained)
    assert mixed[:4] == alone
    for ids, reason in mixed[4:]:
        assert reason == "stop"
        jsonschema.validate(json.loads(tokenizer.decode(ids)), PERSON)
    assert not engine.guided and engine.stats()["kv_usage"] == 0


def token_steps(engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams]) -> list[list[int]]:
    """Per request, the engine step (counted from 1) that returned each of its tokens."""
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    steps: dict[str, list[int]] = {i: [] for i in ids}
    step = 0
    while engine.has_unfinished():
        step += 1
        for out in engine.step():
            steps[out.request_id] += [step] * len(out.new_token_ids)
    return [steps[i] for i in ids]


def test_constrained_rows_do_not_delay_their_batch_mates(demo):
    """With overlap, a step with constrained rows reads the previous step's tokens before sampling: every
    token of a free request beside constrained ones is returned in the same step as without them, and the
    constrained rows' first tokens come in that step too when their grammar was compiled before (nothing
    held back a step, no step added)."""
    model, tokenizer, chat, compiler = demo
    questions = ["你好", "介绍一下你自己", "What is TeleChat?", "写一首诗"]
    free = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    spec = GrammarSpec("json_schema", json.dumps(bound_json_schema(PERSON, *json_bounds(24))))
    compiler.compile(spec)
    guided = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, guided=spec)
    alone = token_steps(LLMEngine(model, EngineConfig(max_num_seqs=8, overlap=True)),
                        [prompt(chat, q) for q in questions], [free] * 4)
    engine = LLMEngine(model, EngineConfig(max_num_seqs=8, overlap=True), grammars=compiler)
    mixed = token_steps(engine, [prompt(chat, q) for q in questions] * 2, [guided] * 4 + [free] * 4)
    assert mixed[4:] == alone
    assert [s[0] for s in mixed] == [alone[0][0]] * 8 and alone[0][0] == 2  # prefill in step 1, read in step 2


def test_regex_and_choice(demo):
    model, tokenizer, chat, compiler = demo
    engine = LLMEngine(model, EngineConfig(max_num_seqs=4, overlap=True), grammars=compiler)
    regex = r"[0-9]{3}-[a-z]{2,6}( [A-Z][a-z]{0,4})?"
    choices = ["红色", "green", "蓝色 blue"]
    params = [SamplingParams(max_tokens=40, temperature=1.0, seed=s, stop_token_ids=chat.stop_token_ids,
                             guided=GrammarSpec("regex", regex)) for s in range(2)]
    params += [SamplingParams(max_tokens=40, temperature=1.0, seed=s, stop_token_ids=chat.stop_token_ids,
                              guided=GrammarSpec("choice", json.dumps(choices))) for s in range(2)]
    out = run(engine, [prompt(chat, "你好")] * 4, params)
    for ids, reason in out[:2]:
        assert reason == "stop" and re.fullmatch(regex, tokenizer.decode(ids))
    for ids, reason in out[2:]:
        assert reason == "stop" and tokenizer.decode(ids) in choices


def test_preempted_constrained_rows_still_validate(demo):
    """A KV cache far too small for the batch: constrained rows are preempted and recomputed, and their
    matchers stay with the tokens read (the replies still validate)."""
    model, tokenizer, chat, compiler = demo
    mc = model.config
    per_token = PagedKVCache.bytes_per_token(mc.n_layer, mc.num_key_value_heads, mc.head_dim, torch.float32)
    engine = LLMEngine(model, EngineConfig(max_num_seqs=6, block_size=4, kv_cache_memory=per_token * 4 * 120,
                                           max_model_len=480, overlap=True), grammars=compiler)
    params = [schema_params(chat, PERSON, temperature=1.0, seed=s) for s in range(6)]
    out = run(engine, [prompt(chat, "介绍一下你自己")] * 6, params)
    assert engine.stats()["preemptions"] > 0
    for ids, reason in out:
        assert reason == "stop"
        jsonschema.validate(json.loads(tokenizer.decode(ids)), PERSON)


def test_bounded_strings_take_json_string_characters_only(demo):
    """Length-bounded strings and keys (bound_json_schema bounds every free one) take exactly the JSON
    documents a JSON parser reads and the schema validates: no control characters (xgrammar 0.2.9's own
    bounded strings let them through: the demo model once wrote a raw U+001D), escapes counted as one
    character, the bound kept."""
    *_, compiler = demo
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 4},
                                               "ids": {"type": "object", "propertyNames": {"maxLength": 3},
                                                       "additionalProperties": {"type": "integer"}}},
              "required": ["name", "ids"]}
    spec = GrammarSpec("json_schema", json.dumps(schema))
    check_grammar(spec)  # the API's check builds the same grammar

    def valid(text: str) -> bool:
        try:
            jsonschema.validate(json.loads(text), schema)
        except (ValueError, jsonschema.ValidationError):
            return False
        return True

    names = ["abcd", "abcde", "ab\x1dc", "a\tb", 'a\\"b', "a\\u00e9bc", "a\\u00e9bcd", "x\\\\y", "a\\qb"]
    keys = ["k", "k\x01", "kkkk", 'k\\"']
    texts = [f'{{"name": "{n}", "ids": {{}}}}' for n in names] + [f'{{"name": "a", "ids": {{"{k}": 1}}}}' for k in keys]
    for text in texts:
        matcher = compiler.matcher(spec, [])
        assert (matcher.accept_string(text) and matcher.is_completed()) == valid(text), text
    assert sum(map(valid, texts)) == 6


def test_bad_grammar_is_refused_alone(demo):
    """A schema or regex that cannot compile is refused after add_request accepted it (it compiles off the
    engine loop): the request leaves with no output, take_refused says why, and a free request sent with
    it runs exactly as alone."""
    model, tokenizer, chat, compiler = demo
    engine = LLMEngine(model, EngineConfig(max_num_seqs=4), grammars=compiler)
    p = prompt(chat, "你好")
    free = SamplingParams(max_tokens=20, temperature=0, stop_token_ids=chat.stop_token_ids)
    bad = [SamplingParams(max_tokens=8, stop_token_ids=chat.stop_token_ids, guided=spec)
           for spec in (GrammarSpec("json_schema", '{"type": "objx"}'), GrammarSpec("regex", "a(b"))]
    ids = [engine.add_request(p, sp) for sp in bad]
    refused, out = {}, []
    free_id = engine.add_request(p, free)
    while engine.has_unfinished():
        for o in engine.step():
            assert o.request_id == free_id
            out += o.new_token_ids
        refused.update(engine.take_refused())
    assert sorted(refused) == sorted(ids) and all("the grammar cannot be used" in why for why in refused.values())
    assert not engine.guided and not engine.guided.compiling
    plain, expected = LLMEngine(model, EngineConfig(max_num_seqs=2)), []
    plain.add_request(p, free)
    while plain.has_unfinished():
        expected += [t for o in plain.step() for t in o.new_token_ids]
    assert out == expected
    with pytest.raises(GrammarError):  # generate() raises it
        engine.generate([p], bad[1])
    with pytest.raises(GrammarError):  # an engine without a compiler refuses constrained requests at once
        LLMEngine(model, EngineConfig(max_num_seqs=2)).add_request(
            p, SamplingParams(max_tokens=8, guided=GrammarSpec("regex", "[a-z]+")))


SLOW = GrammarSpec("json_schema", json.dumps({"type": "string", "pattern": "^[0-9a-f]{1,2500}$"}))
"""About a second to build with xgrammar 0.2.9 (the cost grows with the square of the bound)."""


def test_a_slow_grammar_holds_back_its_request_only(demo):
    """A grammar that takes long to compile: the free requests beside it stream every token at the same
    step as when alone, while it compiles on a worker thread; then its request runs and matches. With a
    limit shorter than the compile, it is refused alone, saying why."""
    model, tokenizer, chat, _ = demo
    compiler = GrammarCompiler(lambda: tokenizer, model.config.vocab_size)  # nothing compiled yet
    questions = ["你好", "介绍一下你自己"]
    free = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    slow = SamplingParams(max_tokens=24, temperature=0, stop_token_ids=chat.stop_token_ids, guided=SLOW)
    alone = token_steps(LLMEngine(model, EngineConfig(max_num_seqs=4)), [prompt(chat, q) for q in questions],
                        [free] * 2)
    engine = LLMEngine(model, EngineConfig(max_num_seqs=4), grammars=compiler)
    mixed = token_steps(engine, [prompt(chat, "写一个十六进制数")] + [prompt(chat, q) for q in questions],
                        [slow] + [free] * 2)
    assert mixed[1:] == alone
    assert mixed[0] and mixed[0][0] > alone[0][-1]  # its first token after the free requests ended
    ids, reason = run(engine, [prompt(chat, "写一个十六进制数")], [slow])[0]  # compiled now: no wait
    assert re.fullmatch(r'"[0-9a-f]{1,2500}"', tokenizer.decode(ids)) or reason == "length"

    hurried = LLMEngine(model, EngineConfig(max_num_seqs=4, grammar_timeout_s=0.05),
                        grammars=GrammarCompiler(lambda: tokenizer, model.config.vocab_size))
    rid = hurried.add_request(prompt(chat, "你好"), slow)
    done = token_steps(hurried, [prompt(chat, q) for q in questions], [free] * 2)
    while hurried.has_unfinished():
        hurried.step()
    refused = hurried.take_refused()
    assert done == alone and list(refused) == [rid] and "took longer than 0.05 s to compile" in refused[rid]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_constrained_rows_on_cuda_with_graphs_and_overlap(demo_model_dir):
    """On the GPU (overlap and decode CUDA graphs on by default): the masks reach the device through the
    pinned step copy, constrained replies validate, free rows are unchanged."""
    from telechat.model.checkpoint import inspect_checkpoint
    from telechat.model.loader import load_model
    from telechat.tokenizer import load_tokenizer

    info = inspect_checkpoint(demo_model_dir, need_tokenizer=True)
    model = load_model(info, device="cuda", dtype="float32")
    tokenizer = load_tokenizer(demo_model_dir)
    chat = ChatFormat(tokenizer, info.generation)
    compiler = GrammarCompiler.from_path(str(demo_model_dir), model.config.vocab_size)
    questions = ["你好", "谢谢", "写一首诗", "讲个笑话"] * 4
    free = SamplingParams(max_tokens=60, temperature=0, stop_token_ids=chat.stop_token_ids)
    engine = LLMEngine(model, EngineConfig(max_num_seqs=32), grammars=compiler)
    assert engine.overlap and engine.runner.graphs is not None
    alone = run(engine, [prompt(chat, q) for q in questions], [free] * len(questions))
    constrained = [schema_params(chat, PERSON, temperature=1.0, seed=s) for s in range(len(questions))]
    mixed = run(engine, [prompt(chat, q) for q in questions] * 2, [free] * len(questions) + constrained)
    assert mixed[:len(questions)] == alone
    for ids, reason in mixed[len(questions):]:
        assert reason == "stop"
        jsonschema.validate(json.loads(tokenizer.decode(ids)), PERSON)
