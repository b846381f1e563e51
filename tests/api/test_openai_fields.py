"""OpenAI feature parity (issue 18) against a real server over the demo model, through the official
``openai`` client and raw HTTP: logprobs, n > 1, prompt lists, continuing the final assistant
message, the developer role, model aliases, logit_bias / min_tokens / min_p / stop_token_ids /
penalties, /tokenize and /detokenize, /v1/embeddings, and a 400 for every bad value."""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from openai import OpenAI


HELLO = [{"role": "user", "content": "你好"}]
ALIAS = "my-alias"


@pytest.fixture(scope="module")
def server(demo_model_dir, api_server):
    return api_server(demo_model_dir, "--max-num-seqs", "8", "--served-model-name", "telechat-demo", ALIAS)


@pytest.fixture(scope="module")
def model(demo_model_dir):
    from telechat.model.loader import load_model

    return load_model(demo_model_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def tokenizer(demo_model_dir):
    from telechat.tokenizer import load_tokenizer

    return load_tokenizer(demo_model_dir)


def client(server) -> OpenAI:
    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=120)


def log_softmax_after(model, ids: list[int]) -> torch.Tensor:
    """``[len(ids), V]``: the next-token log-probabilities after each position (one forward pass)."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def tokenize(server, **body) -> list[int]:
    r = post(server, "/tokenize", body)
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


# ---------------------------------------------------------------------------------------------- logprobs

def test_chat_logprobs_equal_a_forward_pass(server, model, tokenizer):
    r = client(server).chat.completions.create(model="telechat-demo", messages=HELLO, max_tokens=12,
                                               temperature=0.8, seed=5, logprobs=True, top_logprobs=4)
    content = r.choices[0].logprobs.content
    prompt = tokenize(server, messages=HELLO)
    # token ids of the reply: the text of each entry is one token's decode
    ids = [tokenizer.encode(e.token, add_special_tokens=False)[0] for e in content]
    assert tokenizer.decode(ids) == r.choices[0].message.content
    ref = log_softmax_after(model, prompt + ids)[len(prompt) - 1 :]
    for step, (entry, token) in enumerate(zip(content, ids)):
        assert entry.logprob == pytest.approx(ref[step, token].item(), abs=1e-3)
        assert entry.bytes == list(entry.token.encode("utf-8"))
        top = ref[step].topk(4)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-3)
        assert [t.token for t in entry.top_logprobs] == [tokenizer.decode([i]) for i in top.indices.tolist()]
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)


def test_chat_logprobs_streamed_equal_non_streamed(server):
    kw = dict(model="telechat-demo", messages=HELLO, max_tokens=10, temperature=0, logprobs=True, top_logprobs=2)
    c = client(server)
    full = c.chat.completions.create(**kw).choices[0].logprobs.content
    streamed = [e for ch in c.chat.completions.create(**kw, stream=True) for choice in ch.choices
                if choice.logprobs for e in choice.logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in full]
    no = c.chat.completions.create(model="telechat-demo", messages=HELLO, max_tokens=4, temperature=0)
    assert no.choices[0].logprobs is None


def test_completion_logprobs_shape_and_values(server, model, tokenizer):
    prompt = tokenize(server, messages=HELLO)
    r = client(server).completions.create(model="telechat-demo", prompt=prompt, max_tokens=8, temperature=0,
                                          logprobs=3)
    lp = r.choices[0].logprobs
    ids = [tokenizer.encode(t, add_special_tokens=False)[0] for t in lp.tokens]
    ref = log_softmax_after(model, prompt + ids)[len(prompt) - 1 :]
    assert lp.token_logprobs == pytest.approx([ref[i, t].item() for i, t in enumerate(ids)], abs=1e-3)
    assert all(len(top) == 3 for top in lp.top_logprobs)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert ids[0] == ref[0].argmax().item()  # greedy: the first token is the most likely one
    streamed = [c for c in client(server).completions.create(model="telechat-demo", prompt=prompt, max_tokens=8,
                                                              temperature=0, logprobs=3, stream=True)]
    tokens = [t for c in streamed for ch in c.choices if ch.logprobs for t in ch.logprobs.tokens]
    offsets = [o for c in streamed for ch in c.choices if ch.logprobs for o in ch.logprobs.text_offset]
    assert tokens == lp.tokens and offsets == lp.text_offset


# ---------------------------------------------------------------------------------------------- n > 1

OPEN = "abc"
"""A raw prompt the demo model was not trained on: its next-token distribution is wide, so samples differ."""


def test_n_with_seed_is_reproducible_and_choices_differ(server):
    kw = dict(model="telechat-demo", prompt=OPEN, max_tokens=12, temperature=1.0, seed=42, n=3)
    c = client(server)
    a, b = c.completions.create(**kw), c.completions.create(**kw)
    texts = [ch.text for ch in a.choices]
    assert [ch.index for ch in a.choices] == [0, 1, 2]
    assert texts == [ch.text for ch in b.choices]
    assert len(set(texts)) > 1
    # choice j samples with seed + j: each equals a one-choice request with that seed
    singles = [c.completions.create(**{**kw, "n": 1, "seed": 42 + j}) for j in range(3)]
    assert [s.choices[0].text for s in singles] == texts
    assert a.usage.prompt_tokens == singles[0].usage.prompt_tokens  # the prompt counts once
    assert a.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)


def test_best_of_returns_the_candidates_with_the_best_mean_logprob(server):
    """best_of=4, n=2 samples the same candidates as n=4 (seed + j) and returns the two whose tokens have
    the highest mean log-probability, best first; usage counts all four."""
    c = client(server)
    kw = dict(model="telechat-demo", prompt=OPEN, max_tokens=10, temperature=1.0, seed=11)
    every = c.completions.create(**kw, n=4, logprobs=0)
    mean = [sum(ch.logprobs.token_logprobs) / len(ch.logprobs.token_logprobs) for ch in every.choices]
    ranked = [every.choices[i].text for i in sorted(range(4), key=lambda i: mean[i], reverse=True)]
    best = c.completions.create(**kw, n=2, best_of=4)
    assert [ch.text for ch in best.choices] == ranked[:2] and [ch.index for ch in best.choices] == [0, 1]
    assert best.choices[0].logprobs is None  # not asked for: used for ranking only
    assert best.usage.completion_tokens == every.usage.completion_tokens


def test_n_streamed_indices_join_to_non_streamed(server):
    kw = dict(model="telechat-demo", messages=[{"role": "user", "content": OPEN}], max_tokens=16,
              temperature=1.0, seed=7, n=2)
    c = client(server)
    full = c.chat.completions.create(**kw)
    parts: dict[int, str] = {0: "", 1: ""}
    finished = set()
    usage = None
    for chunk in c.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}):
        for ch in chunk.choices:
            parts[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                finished.add(ch.index)
        usage = chunk.usage or usage
    assert finished == {0, 1}
    assert [parts[0], parts[1]] == [ch.message.content for ch in full.choices]
    assert usage.completion_tokens == full.usage.completion_tokens
    assert usage.prompt_tokens == full.usage.prompt_tokens
    raw = dict(model="telechat-demo", prompt=OPEN, max_tokens=12, temperature=1.0, seed=3, n=2)
    texts = {0: "", 1: ""}
    for chunk in c.completions.create(**raw, stream=True):
        for ch in chunk.choices:
            texts[ch.index] += ch.text
    assert [texts[0], texts[1]] == [ch.text for ch in c.completions.create(**raw).choices]
    assert texts[0] != texts[1]


def prefix_cache_hits(server) -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith("telechat:prefix_cache_hits"):
            return float(line.split()[-1])
    raise AssertionError("no prefix_cache_hits metric")


def test_n_siblings_reuse_the_prompt_cache(server):
    """The 3 siblings of a fresh prompt's first choice find its full blocks (16 tokens each) in the cache."""
    long = [{"role": "user", "content": "一段从未出现过的很长的提问，用来测试多个回答共享提示的缓存。" * 4}]
    before = prefix_cache_hits(server)
    r = client(server).chat.completions.create(model="telechat-demo", messages=long, max_tokens=4,
                                               temperature=1.0, seed=1, n=4)
    assert r.usage.prompt_tokens_details.cached_tokens == 0  # the first choice computed the prompt
    full_blocks = (r.usage.prompt_tokens - 1) // 16 * 16
    assert prefix_cache_hits(server) - before == 3 * full_blocks


def test_disconnect_aborts_every_choice(server):
    """Closing a stream of 3 choices mid-way aborts all three (streamed and non-streamed)."""
    from tests.api.test_operations import metric, wait_for

    aborted = metric(server, 'telechat:request_success_total{finished_reason="abort"}', 0.0)
    body = {"messages": HELLO, "max_tokens": 1900, "ignore_eos": True, "stream": True, "n": 3}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(12):
            next(lines)
        assert metric(server, "telechat:num_requests_running") == 3
    assert wait_for(lambda: metric(server, "telechat:num_requests_running") == 0, timeout=10)
    assert wait_for(lambda: metric(server, 'telechat:request_success_total{finished_reason="abort"}', 0.0)
                    == aborted + 3)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", json={**body, "stream": False}, timeout=1.0)
    assert wait_for(lambda: metric(server, "telechat:num_requests_running") == 0, timeout=10)


# ---------------------------------------------------------------------------------------------- prompt lists

def test_completion_prompt_list_one_choice_per_prompt(server):
    c = client(server)
    prompts = ["中国的首都是", "你好"]
    r = c.completions.create(model="telechat-demo", prompt=prompts, max_tokens=8, temperature=0)
    assert [ch.index for ch in r.choices] == [0, 1]
    alone = [c.completions.create(model="telechat-demo", prompt=p, max_tokens=8, temperature=0) for p in prompts]
    assert [ch.text for ch in r.choices] == [a.choices[0].text for a in alone]
    assert r.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    assert r.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    ids = [tokenize(server, prompt=p) for p in prompts]
    by_ids = c.completions.create(model="telechat-demo", prompt=ids, max_tokens=8, temperature=0, n=2)
    assert [ch.index for ch in by_ids.choices] == [0, 1, 2, 3]
    assert [ch.text for ch in by_ids.choices] == [r.choices[0].text] * 2 + [r.choices[1].text] * 2


def test_langchain_openai_batch(server):
    from langchain_openai import OpenAI as LangChainOpenAI

    llm = LangChainOpenAI(base_url=server.url + "/v1", api_key="unused", model="telechat-demo", max_tokens=8,
                          temperature=0, max_retries=0)
    prompts = ["中国的首都是", "你好"]
    out = llm.batch(prompts)
    alone = [client(server).completions.create(model="telechat-demo", prompt=p, max_tokens=8, temperature=0)
             .choices[0].text for p in prompts]
    assert out == alone


# ---------------------------------------------------------------------------------------------- chat formats

def test_continue_final_message_equals_raw_completion(server, demo_model_dir):
    from telechat.chat_format import ChatFormat
    from telechat.tokenizer import load_tokenizer

    partial = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！我"}]
    c = client(server)
    r = c.chat.completions.create(model="telechat-demo", messages=partial, max_tokens=16, temperature=0)
    rendered = ChatFormat(load_tokenizer(demo_model_dir)).render(partial, continue_final=True)
    assert rendered.endswith("你好！我")
    raw = c.completions.create(model="telechat-demo", prompt=rendered, max_tokens=16, temperature=0)
    assert r.choices[0].message.content == raw.choices[0].text
    explicit = post(server, "/v1/chat/completions", {"messages": partial, "max_tokens": 16, "temperature": 0,
                                                     "continue_final_message": True, "add_generation_prompt": False})
    assert explicit.status_code == 200 and explicit.json()["choices"][0]["message"]["content"] == raw.choices[0].text
    assert tokenize(server, messages=partial, continue_final_message=True, add_generation_prompt=False) == \
        tokenize(server, prompt=rendered)


def test_developer_role_is_system(server):
    c = client(server)
    kw = dict(model="telechat-demo", max_tokens=12, temperature=0)
    dev = c.chat.completions.create(messages=[{"role": "developer", "content": "你是助手"}] + HELLO, **kw)
    sys = c.chat.completions.create(messages=[{"role": "system", "content": "你是助手"}] + HELLO, **kw)
    assert dev.choices[0].message.content == sys.choices[0].message.content
    assert tokenize(server, messages=[{"role": "developer", "content": "你是助手"}] + HELLO) == \
        tokenize(server, messages=[{"role": "system", "content": "你是助手"}] + HELLO)


# ---------------------------------------------------------------------------------------------- aliases

def test_aliases_listed_accepted_and_echoed(server):
    ids = [m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]]
    assert ids[:2] == ["telechat-demo", ALIAS]
    c = client(server)
    r = c.chat.completions.create(model=ALIAS, messages=HELLO, max_tokens=4, temperature=0)
    assert r.model == ALIAS
    assert c.completions.create(model="telechat-demo", prompt="你好", max_tokens=2).model == "telechat-demo"
    chunks = list(c.chat.completions.create(model=ALIAS, messages=HELLO, max_tokens=4, stream=True))
    assert {ch.model for ch in chunks} == {ALIAS}
    assert post(server, "/v1/chat/completions", {"model": "nope", "messages": HELLO}).status_code == 404


# ---------------------------------------------------------------------------------------------- sampling fields

def first_token(server, **extra) -> tuple[int, list]:
    prompt = tokenize(server, messages=HELLO)
    r = post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 6, "temperature": 0, "logprobs": 0, **extra})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0], prompt


def test_logit_bias_forces_and_bans(server, model, tokenizer):
    choice, prompt = first_token(server)
    greedy = log_softmax_after(model, prompt)[-1].argmax().item()
    assert choice["logprobs"]["tokens"][0] == tokenizer.decode([greedy])
    banned, _ = first_token(server, logit_bias={str(greedy): -100})
    assert banned["logprobs"]["tokens"][0] != tokenizer.decode([greedy])
    forced_id = tokenizer.encode("好", add_special_tokens=False)[0]
    forced, _ = first_token(server, logit_bias={str(forced_id): 100})
    assert forced["text"] == "好" * 6


def test_stop_token_ids_and_min_tokens(server, tokenizer):
    choice, _ = first_token(server, max_tokens=12)
    second = tokenizer.encode(choice["logprobs"]["tokens"][1], add_special_tokens=False)[0]
    stopped, _ = first_token(server, max_tokens=12, stop_token_ids=[second])
    assert stopped["finish_reason"] == "stop" and stopped["text"] == choice["logprobs"]["tokens"][0]
    late, _ = first_token(server, max_tokens=12, stop_token_ids=[second], min_tokens=3)
    assert len(late["logprobs"]["tokens"]) >= 3


def test_min_p_restricts_to_near_top_tokens(server, model):
    prompt = tokenize(server, prompt=OPEN)
    probs = log_softmax_after(model, prompt)[-1].exp()
    allowed = {i for i in range(len(probs)) if probs[i] >= 0.3 * probs.max()}

    def firsts(**extra) -> set[int]:
        out = set()
        for seed in range(12):
            r = post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 1, "temperature": 1.0, "seed": seed,
                                                 "logprobs": 0, **extra}).json()
            out.add(tokenize(server, prompt=r["choices"][0]["logprobs"]["tokens"][0])[0])
        return out

    assert firsts(min_p=0.3) <= allowed
    assert not firsts() <= allowed  # the same seeds reach other tokens without it: min_p did the filtering


def test_frequency_and_presence_penalties_accepted(server):
    r = client(server).chat.completions.create(model="telechat-demo", messages=HELLO, max_tokens=8, temperature=0,
                                               frequency_penalty=1.5, presence_penalty=0.5)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_include_stop_str_in_output(server):
    base = post(server, "/v1/completions", {"prompt": "中国的首都是", "max_tokens": 12, "temperature": 0}).json()
    text = base["choices"][0]["text"]
    assert len(text) >= 3
    stop = text[1:3]
    cut = post(server, "/v1/completions", {"prompt": "中国的首都是", "max_tokens": 12, "temperature": 0,
                                           "stop": [stop]}).json()["choices"][0]["text"]
    kept = post(server, "/v1/completions", {"prompt": "中国的首都是", "max_tokens": 12, "temperature": 0,
                                            "stop": [stop], "include_stop_str_in_output": True}).json()
    assert cut == text[: text.index(stop)] and kept["choices"][0]["text"] == cut + stop


def test_user_is_in_the_log_line(server):
    client(server).chat.completions.create(model="telechat-demo", messages=HELLO, max_tokens=2, user="alice-42")
    assert "user='alice-42'" in server.log()


def test_served_model_name_flag_and_env():
    from services import settings_cli
    from services.api.settings import Settings

    parser = settings_cli.build_parser(Settings, prog="serve", description="")
    assert settings_cli.load(Settings, parser.parse_args(["--served-model-name", "a", "b"]), environ={}
                             ).served_names == ["a", "b"]
    assert settings_cli.load(Settings, {}, environ={"MODEL_NAME": "x, y"}).served_names == ["x", "y"]
    assert settings_cli.load(Settings, {}, environ={}).served_names == []
    with pytest.raises(settings_cli.SettingsError, match="repeat"):
        settings_cli.load(Settings, {}, environ={"MODEL_NAME": "x,x"})


# ---------------------------------------------------------------------------------------------- tokenizer routes

def test_tokenize_detokenize_round_trip(server, tokenizer):
    r = post(server, "/tokenize", {"model": "telechat-demo", "prompt": "你好，世界"}).json()
    assert r["tokens"] == tokenizer.encode("你好，世界", add_special_tokens=False)
    assert r["count"] == len(r["tokens"]) and r["max_model_len"] == 2048
    assert post(server, "/detokenize", {"tokens": r["tokens"]}).json() == {"prompt": "你好，世界"}
    chat = post(server, "/tokenize", {"messages": HELLO}).json()
    prompt_tokens = client(server).chat.completions.create(model="telechat-demo", messages=HELLO,
                                                           max_tokens=1).usage.prompt_tokens
    assert chat["count"] == prompt_tokens


def test_embeddings_is_a_clear_404(server):
    r = post(server, "/v1/embeddings", {"model": "telechat-demo", "input": "hi"})
    assert r.status_code == 404
    assert "chat and completion models only" in r.json()["error"]["message"]


def test_api_key_guards_the_tokenizer_routes(demo_model_dir, api_server):
    guarded = api_server(demo_model_dir, env={"API_KEY": "k"})
    assert post(guarded, "/tokenize", {"prompt": "x"}).status_code == 401
    assert post(guarded, "/detokenize", {"tokens": [1]}).status_code == 401
    ok = httpx.post(guarded.url + "/tokenize", json={"prompt": "x"}, headers={"Authorization": "Bearer k"})
    assert ok.status_code == 200


# ---------------------------------------------------------------------------------------------- bad values

BAD_CHAT = [
    {"n": 0}, {"n": 129}, {"n": "2"}, {"logprobs": "yes"}, {"top_logprobs": 21}, {"top_logprobs": -1},
    {"top_logprobs": 2}, {"logit_bias": {"abc": 1}}, {"logit_bias": {"5": 101}}, {"logit_bias": {"5": "1"}},
    {"logit_bias": {"99999999": 1}}, {"frequency_penalty": 2.5}, {"presence_penalty": -3}, {"min_p": 1.5},
    {"min_p": -0.1}, {"min_tokens": -1}, {"min_tokens": 5, "max_tokens": 2}, {"stop_token_ids": [-1]},
    {"stop_token_ids": [99999999]}, {"stop_token_ids": "1"}, {"include_stop_str_in_output": "x"},
    {"continue_final_message": True}, {"continue_final_message": "x"}, {"add_generation_prompt": 1},
]


@pytest.mark.parametrize("extra", BAD_CHAT, ids=json.dumps)
def test_bad_chat_values_are_400(server, extra):
    r = post(server, "/v1/chat/completions", {"messages": HELLO, "max_tokens": 4, **extra})
    assert r.status_code == 400, (extra, r.text)
    assert r.json()["error"]["message"]


BAD_COMPLETIONS = [
    {"logprobs": 6}, {"logprobs": True}, {"prompt": []}, {"prompt": ["a", [1, 2]]}, {"prompt": ["a", ""]},
    {"prompt": [[1], []]}, {"prompt": ["x"] * 65, "n": 2}, {"n": 200}, {"prompt": [[10**9]]},
    {"best_of": 21}, {"best_of": 1, "n": 2}, {"best_of": 3, "stream": True}, {"best_of": 0}, {"best_of": "2"},
    {"prompt": ["x"] * 10, "best_of": 13},
]


@pytest.mark.parametrize("extra", BAD_COMPLETIONS, ids=json.dumps)
def test_bad_completion_values_are_400(server, extra):
    r = post(server, "/v1/completions", {"prompt": "你好", "max_tokens": 4, **extra})
    assert r.status_code == 400, (extra, r.text)
    assert r.json()["error"]["message"]


def test_bad_tokenizer_requests_are_400(server):
    for path, body in [("/tokenize", {}), ("/tokenize", {"prompt": "x", "messages": HELLO}), ("/tokenize", {"prompt": 3}),
                       ("/detokenize", {"tokens": [-1]}), ("/detokenize", {"tokens": [10**9]}),
                       ("/detokenize", {"tokens": "1"})]:
        r = post(server, path, body)
        assert r.status_code == 400, (path, body, r.text)


def test_assistant_last_with_continue_false_is_400(server):
    partial = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]
    r = post(server, "/v1/chat/completions", {"messages": partial, "continue_final_message": False})
    assert r.status_code == 400 and "continue" in r.json()["error"]["message"]
