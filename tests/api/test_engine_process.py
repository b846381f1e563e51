"""The API over the engine core process: a core that dies, SIGTERM with a stream open, a model the
core cannot load, and prefix-cache reuse in usage and metrics (real servers on loopback, demo model)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import httpx

from tests.conftest import API_ENV, REPO, free_port
from tests.processes import children, running, wait_for

CHAT = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "你好"}]
STREAM = {"messages": HELLO, "max_tokens": 1900, "ignore_eos": True, "stream": True}
"""A stream that runs for seconds on CPU."""


def core_pid(log: str) -> int:
    """The engine core's pid, as the server logs it at start."""
    return int(re.search(r"engine core process started \(pid (\d+)\)", log).group(1))



def metric(server, name: str) -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def test_killed_core_fails_streams_and_new_requests(demo_model_dir, api_server):
    """SIGKILL to the engine core with a stream open: the stream ends with an error event and [DONE];
    /ready turns 503 'failed', new requests get 503 naming the exit, /health still answers."""
    server = api_server(demo_model_dir)
    core = core_pid(server.log())
    assert core in children(server.proc.pid)
    with httpx.stream("POST", server.url + CHAT, json=STREAM, timeout=60) as r:
        lines = r.iter_lines()
        events = [next(lines), next(lines)]
        os.kill(core, signal.SIGKILL)
        events += [line for line in lines if line]
    reason = "the engine process stopped (exit code -9, SIGKILL); restart the server"
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2][6:])["error"]
    assert error["message"] == f"generation failed: {reason}" and error["type"] == "server_error"
    ready = httpx.get(server.url + "/ready")
    assert ready.status_code == 503 and ready.json() == {"status": "failed", "error": reason}
    r = httpx.post(server.url + CHAT, json={"messages": HELLO, "max_tokens": 4}, timeout=30)
    assert r.status_code == 503, r.text
    assert r.json()["error"]["message"] == reason and r.json()["error"]["code"] == "engine_dead"
    assert httpx.get(server.url + "/health").json() == {"status": "engine_dead"}
    assert server.stop() == 0


def test_sigterm_with_a_stream_open_leaves_no_process(demo_model_dir, api_server):
    """SIGTERM to `telechat serve` while a stream runs: the stream completes (finish event, [DONE]),
    the server exits 0, and the engine core (and every other child) is gone."""
    server = api_server(demo_model_dir)
    kids = children(server.proc.pid)
    assert core_pid(server.log()) in kids
    with httpx.stream("POST", server.url + CHAT, timeout=60,
                      json={"messages": HELLO, "max_tokens": 100, "ignore_eos": True, "stream": True}) as r:
        lines = r.iter_lines()
        events = [next(lines)]
        server.proc.terminate()
        events += [line for line in lines if line]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"
    assert server.proc.wait(60) == 0
    assert wait_for(lambda: not any(running(pid) for pid in kids)), [pid for pid in kids if running(pid)]
    assert "Traceback" not in server.log()


def test_model_the_core_cannot_load_fails_start_in_one_line(demo_model_dir, tmp_path):
    """Weights the core cannot read (the folder itself looks fine): `telechat serve` logs one line
    saying why, exits ≠ 0, and leaves no engine process."""
    bad = tmp_path / "bad-model"
    shutil.copytree(demo_model_dir, bad)
    (bad / "model.safetensors").write_bytes(b"\0" * 64)
    env = {k: v for k, v in os.environ.items() if k not in API_ENV}
    done = subprocess.run([sys.executable, "-m", "services.api", "--model", str(bad), "--host", "127.0.0.1",
                           "--port", str(free_port())], env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300, cwd=REPO)
    log = done.stdout + done.stderr
    assert done.returncode != 0, log
    failed = [line for line in log.splitlines() if "loading the model failed" in line]
    assert len(failed) == 1 and "could not read the weights" in failed[0], log
    assert "Traceback" not in log
    assert not running(core_pid(log))


def test_cached_tokens_match_the_prefix_cache_hits(demo_server):
    """A prompt sent again reuses its cached prefix: usage.prompt_tokens_details.cached_tokens (chat and
    completions, streamed and not) is positive the second time, below the prompt length (the last
    token is always computed), and the reported counts add up to what /metrics counts as hits."""
    long_prompt = "TeleChat " * 40
    hits, queries = metric(demo_server, "telechat:prefix_cache_hits_total"), \
        metric(demo_server, "telechat:prefix_cache_queries_total")
    rounds = []
    for _ in range(2):
        r = httpx.post(demo_server.url + CHAT, timeout=60,
                       json={"messages": [{"role": "user", "content": long_prompt}], "max_tokens": 2})
        chat = r.json()["usage"]
        r = httpx.post(demo_server.url + "/v1/completions", timeout=60,
                       json={"prompt": long_prompt, "max_tokens": 2, "stream": True,
                             "stream_options": {"include_usage": True}})
        completion = json.loads([e for e in r.text.split("\n\n") if e.startswith("data: {")][-1][6:])["usage"]
        rounds.append([(u["prompt_tokens_details"]["cached_tokens"], u["prompt_tokens"]) for u in (chat, completion)])
    assert all(0 < cached < prompt for cached, prompt in rounds[1]), rounds
    reported = sum(cached for r in rounds for cached, _ in r)
    assert metric(demo_server, "telechat:prefix_cache_hits_total") - hits == reported
    looked_up = sum(prompt for r in rounds for _, prompt in r)
    assert metric(demo_server, "telechat:prefix_cache_queries_total") - queries == looked_up
