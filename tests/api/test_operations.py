"""Operations: health/ready/docs, request ids and log lines, metrics, disconnect abort, bounded queue
(429), API key, SIGTERM."""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.processes import wait_for

CHAT = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "你好"}]
LONG = {"messages": HELLO, "max_tokens": 1900, "ignore_eos": True, "stream": True}
"""A stream that runs for seconds on CPU: the demo context is 2048 tokens."""
KEEP_WRITING = "Keep writing forever"
"""The demo model is trained to write until max tokens on this prompt (greedy)."""


def metric(server, name: str, default: float | None = None) -> float:
    """The value of one sample (``name`` with its labels, exactly as exposed)."""
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    if default is None:
        raise KeyError(name)
    return default


def test_health_ready_docs(demo_server):
    assert httpx.get(demo_server.url + "/health").json() == {"status": "ok"}
    assert httpx.get(demo_server.url + "/ready").json() == {"status": "ready", "model": "telechat-demo"}
    assert "swagger" in httpx.get(demo_server.url + "/docs").text.lower()
    spec = httpx.get(demo_server.url + "/openapi.json").json()
    assert "你好" in json.dumps(spec, ensure_ascii=False)
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/telechat/gptDialog/v2",
            "/telechat/gptDialog/v4"} <= set(spec["paths"])


def test_request_id_echoed_and_logged(demo_server):
    """X-Request-ID comes back (made up when absent) and one log line names method, path, status, id."""
    r = httpx.post(demo_server.url + CHAT, json={"messages": HELLO, "max_tokens": 2}, headers={"X-Request-ID": "abc-123"},
                   timeout=60)
    assert r.headers["x-request-id"] == "abc-123"
    assert len(httpx.get(demo_server.url + "/health").headers["x-request-id"]) == 32
    assert wait_for(lambda: "POST /v1/chat/completions 200" in demo_server.log() and "id=abc-123" in demo_server.log(),
                    timeout=10)
    line = next(l for l in demo_server.log().splitlines() if "id=abc-123" in l)
    assert "ms" in line


def test_metrics_move(demo_server):
    """A request moves tokens, TTFT/ITL histograms, the engine's queue and prefill times (which add up to
    less than the TTFT the API saw), the end-to-end latency, finish reasons and status counters."""
    names = ["telechat:num_requests_running", "telechat:num_requests_waiting", "telechat:kv_cache_usage_perc",
             "telechat:kv_cache_capacity_tokens", "telechat:generation_tokens_total", "telechat:prompt_tokens_total",
             "telechat:time_to_first_token_seconds_count", "telechat:inter_token_latency_seconds_count"]
    times = [f"telechat:{n}_seconds_{part}" for n in ("time_to_first_token", "request_queue_time",
                                                       "request_prefill_time", "e2e_request_latency")
             for part in ("count", "sum")]
    names += times
    before = {n: metric(demo_server, n, 0.0) for n in names}
    ok_before = metric(demo_server, 'telechat:requests_total{status="200"}', 0.0)
    length_before = metric(demo_server, 'telechat:request_success_total{finished_reason="length"}', 0.0)
    r = httpx.post(demo_server.url + CHAT, json={"messages": HELLO, "max_tokens": 6, "ignore_eos": True}, timeout=60)
    assert r.json()["usage"]["completion_tokens"] == 6
    after = {n: metric(demo_server, n) for n in names}
    assert after["telechat:generation_tokens_total"] >= before["telechat:generation_tokens_total"] + 6
    assert after["telechat:prompt_tokens_total"] > before["telechat:prompt_tokens_total"]
    assert after["telechat:time_to_first_token_seconds_count"] == before["telechat:time_to_first_token_seconds_count"] + 1
    assert after["telechat:inter_token_latency_seconds_count"] > before["telechat:inter_token_latency_seconds_count"]
    assert after["telechat:kv_cache_capacity_tokens"] > 0
    moved = {n: after[n] - before[n] for n in times}
    assert all(moved[n] == 1 for n in times if n.endswith("_count"))
    engine_share = moved["telechat:request_queue_time_seconds_sum"] + moved["telechat:request_prefill_time_seconds_sum"]
    assert 0 < engine_share <= moved["telechat:time_to_first_token_seconds_sum"]
    assert moved["telechat:e2e_request_latency_seconds_sum"] >= moved["telechat:time_to_first_token_seconds_sum"]
    assert metric(demo_server, 'telechat:request_success_total{finished_reason="length"}') == length_before + 1
    # counted once the response is sent, which a fast client can see before the count: poll
    assert wait_for(lambda: metric(demo_server, 'telechat:requests_total{status="200"}') > ok_before, timeout=5)


def test_no_transformers_noise_in_the_log(demo_server):
    """Neither loading the checkpoint (transformers' generation-config check) nor a prompt longer than the
    tokenizer's nominal maximum (refused with a 400 by the API itself) puts transformers warnings in the log."""
    long = {"messages": [{"role": "user", "content": "天气晴朗 " * 6000}], "max_tokens": 2}
    r = httpx.post(demo_server.url + CHAT, json=long, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    log = demo_server.log()
    assert "generation flags" not in log and "Token indices sequence length" not in log


def test_disconnect_aborts_and_frees_the_slot(demo_server):
    """Closing a stream mid-way aborts its generation: running goes back to 0, tokens stop growing."""
    aborted = metric(demo_server, 'telechat:request_success_total{finished_reason="abort"}', 0.0)
    with httpx.stream("POST", demo_server.url + CHAT, json=LONG, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
        assert metric(demo_server, "telechat:num_requests_running") == 1
    assert wait_for(lambda: metric(demo_server, "telechat:num_requests_running") == 0, timeout=5)
    tokens = metric(demo_server, "telechat:generation_tokens_total")
    time.sleep(0.5)
    assert metric(demo_server, "telechat:generation_tokens_total") == tokens
    assert wait_for(lambda: metric(demo_server, 'telechat:request_success_total{finished_reason="abort"}', 0.0)
                    == aborted + 1, timeout=10)


def test_disconnect_aborts_non_streamed_request(demo_server):
    """A non-streamed request whose client gives up is aborted too."""
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(demo_server.url + CHAT, json={**LONG, "stream": False}, timeout=1.0)
    assert wait_for(lambda: metric(demo_server, "telechat:num_requests_running") == 0, timeout=5)


# ---------------------------------------------------------------------------------------------- strict server

KEY = {"Authorization": "Bearer s3cret"}


@pytest.fixture(scope="module")
def strict_server(demo_model_dir, api_server):
    """API key on, one running sequence, a queue of one."""
    server = api_server(demo_model_dir, env={"API_KEY": "s3cret", "MAX_NUM_SEQS": "1", "MAX_QUEUE": "1"})
    yield server
    server.stop()


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}],
                         ids=["missing", "wrong", "no-scheme"])
@pytest.mark.parametrize("method, path", [("GET", "/v1/models"), ("POST", CHAT), ("POST", "/telechat/gptDialog/v4")])
def test_api_key_required(strict_server, headers, method, path):
    r = httpx.request(method, strict_server.url + path, headers=headers, json={"messages": HELLO})
    assert r.status_code == 401
    assert r.json()["error"]["type"] == "authentication_error" and "API key" in r.json()["error"]["message"]


def test_api_key_accepted_and_ops_routes_open(strict_server):
    assert httpx.get(strict_server.url + "/v1/models", headers=KEY).status_code == 200
    for path in ("/health", "/ready", "/metrics", "/docs", "/openapi.json"):
        assert httpx.get(strict_server.url + path).status_code == 200, path
    from openai import OpenAI

    c = OpenAI(base_url=strict_server.url + "/v1", api_key="s3cret", max_retries=0)
    assert c.chat.completions.create(model="telechat-demo", messages=HELLO, max_tokens=3).choices[0].message.content


def test_choices_past_capacity_get_429_and_give_their_slots_back(strict_server):
    """n = 3 on a server that admits 2: the third choice is refused, so the request gets 429 (not a 500), and
    the two choices admitted before it are closed and give their slots back — the next request is served."""
    r = httpx.post(strict_server.url + CHAT, json={"messages": HELLO, "max_tokens": 2, "n": 3}, headers=KEY,
                   timeout=60)
    assert r.status_code == 429 and r.json()["error"]["code"] == "server_overloaded", r.text
    ok = httpx.post(strict_server.url + CHAT, json={"messages": HELLO, "max_tokens": 2, "n": 2}, headers=KEY,
                    timeout=60)
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 2, ok.text


def test_overload_gets_429_with_retry_after(strict_server):
    """Capacity is one running + one queued: of requests arriving together, the rest get 429 with
    Retry-After, on both route families; once the others finish, requests are accepted again."""
    long_chat = {**LONG, "stream": False, "max_tokens": 600}  # a second or more each on CPU

    def chat(_):
        return httpx.post(strict_server.url + CHAT, json=long_chat, headers=KEY, timeout=120)

    def legacy(_):
        time.sleep(0.3)  # after the chats took the slots (each of them runs for seconds)
        return httpx.post(strict_server.url + "/telechat/gptDialog/v4", json={"dialog": HELLO}, headers=KEY, timeout=120)

    with ThreadPoolExecutor(5) as pool:
        futures = [pool.submit(chat, i) for i in range(4)]
        refused = pool.submit(legacy, None).result()
        chats = [f.result() for f in futures]
    assert sorted(r.status_code for r in chats) == [200, 200, 429, 429], [r.text for r in chats]
    for r in chats:
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1 and r.json()["error"]["code"] == "server_overloaded"
    assert refused.status_code == 429 and refused.json()["code"] == 10903, refused.text
    assert httpx.post(strict_server.url + CHAT, json={"messages": HELLO, "max_tokens": 2}, headers=KEY,
                      timeout=60).status_code == 200


# ---------------------------------------------------------------------------------------------- SIGTERM

def test_serving_processes_freeze_their_start_up_heap(demo_model_dir, api_server):
    """Once ready, the API process and the engine core have moved their start-up objects (modules, model,
    tokenizer) out of garbage collection (telechat/heap.py: a full collection walking ~400k of them stalled
    every stream of a CPU server for 250 ms under load); requests are served as before, and the exit is as
    quiet as before (frozen objects left at teardown made Triton's bindings print dozens of "leaked" lines)."""
    server = api_server(demo_model_dir, "--log-level", "debug")
    r = httpx.post(server.url + CHAT, json={"messages": HELLO, "max_tokens": 8}, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
    frozen = dict(re.findall(r"(API process|engine core): (\d+) start-up objects frozen", server.log()))
    assert set(frozen) == {"API process", "engine core"}, server.log()[-2000:]
    assert min(int(n) for n in frozen.values()) > 10_000
    server.proc.terminate()  # and the heap is thawed for the exit: no native module reports "leaks"
    assert server.proc.wait(60) == 0
    assert "leaked" not in server.log(), server.log()[-2000:]


def test_sigterm_finishes_in_flight_then_exits_0(demo_model_dir, api_server):
    """SIGTERM: new connections are refused, the running stream completes, the process exits 0."""
    server = api_server(demo_model_dir)
    events: list[str] = []
    with httpx.stream("POST", server.url + CHAT, timeout=60,
                      json={"messages": HELLO, "max_tokens": 150, "ignore_eos": True, "stream": True}) as r:
        lines = r.iter_lines()
        events.append(next(lines))
        server.proc.terminate()
        events += [line for line in lines if line]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"
    assert server.proc.wait(60) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/health")


def _read_stream(url: str, body: dict, started) -> list[str]:
    """All non-empty SSE lines of one stream (httpx raises if the stream is cut mid-chunk)."""
    with httpx.stream("POST", url, json=body, timeout=60) as r:
        lines = r.iter_lines()
        out = [next(lines)]
        started.release()
        return out + [line for line in lines if line]


def test_sigterm_ends_long_streams_with_error_event_and_done(demo_model_dir, api_server):
    """SIGTERM with streams longer than the grace period: new requests are refused, every stream
    ends properly (an OpenAI error event, then [DONE]; legacy v2: its error line) at the grace
    period, the process exits 0 soon after, and the log holds no traceback."""
    import threading

    server = api_server(demo_model_dir, "--shutdown-grace", "2", "--max-num-seqs", "7")
    started = threading.Semaphore(0)
    with ThreadPoolExecutor(10) as pool:
        streams = [pool.submit(_read_stream, server.url + CHAT, LONG, started) for _ in range(6)]

        def legacy_stream() -> bytes:
            with httpx.stream("POST", server.url + "/telechat/gptDialog/v2", timeout=60,
                              json={"dialog": [{"role": "user", "content": KEEP_WRITING}],
                                    "do_sample": False, "max_length": 2048}) as r:
                return r.read()

        for _ in streams:
            assert started.acquire(timeout=60)
        legacy = pool.submit(legacy_stream)
        assert wait_for(lambda: metric(server, "telechat:num_requests_running") >= 7, 90)
        # Two more wait in the queue (the batch is full): they end without any text.
        queued_chat = pool.submit(httpx.post, server.url + CHAT, json={**LONG, "stream": False}, timeout=60)
        queued_v2 = pool.submit(httpx.post, server.url + "/telechat/gptDialog/v2", json={"dialog": HELLO}, timeout=60)
        assert wait_for(lambda: metric(server, "telechat:num_requests_waiting") >= 2, 90)
        t0 = time.monotonic()
        server.proc.terminate()
        time.sleep(0.5)
        with pytest.raises(httpx.ConnectError):  # the listening socket is closed at once
            httpx.get(server.url + "/health", timeout=5)
        results = [f.result(timeout=60) for f in streams]
        legacy_body = legacy.result(timeout=60).decode("utf-8")
    ended = time.monotonic() - t0
    for events in results:
        assert events[-1] == "data: [DONE]"
        error = json.loads(events[-2][6:])["error"]
        assert "shutting down" in error["message"] and error["type"] == "service_unavailable_error"
    last_line = json.loads(legacy_body.rstrip("\n").rsplit("\n", 1)[1])
    assert last_line["code"] == 10903 and "shutting down" in last_line["detail"]
    chat, v2 = queued_chat.result(), queued_v2.result()
    assert chat.status_code == 503 and chat.json()["error"]["code"] == "shutting_down", chat.text
    assert v2.status_code == 503 and v2.json()["code"] == 10903 and "shutting down" in v2.json()["detail"], v2.text
    assert 1.5 < ended < 30, ended  # the grace period, then one engine step (seconds on a busy CPU)
    assert server.proc.wait(60) == 0
    assert time.monotonic() - t0 < 45
    assert "Traceback" not in server.log() and "CancelledError" not in server.log()
