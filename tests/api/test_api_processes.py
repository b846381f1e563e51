"""Several API processes over one engine core (``--api-server-count``): serving, summed metrics,
drain on SIGTERM, a dead core (503), a dead API process (the server stops), a model that cannot load."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from tests.api.test_operations import CHAT, HELLO, LONG, _read_stream, metric
from tests.conftest import free_port
from tests.processes import children, running, wait_for


def tree(pid: int) -> list[int]:
    """``pid``'s live descendants."""
    kids = children(pid)
    return kids + [p for k in kids for p in tree(k)]


def core_pid(server) -> int:
    """The engine core's pid, from the supervisor's log line."""
    return int(re.search(r"engine core process started \(pid (\d+)\)", server.log()).group(1))


def api_pids(server) -> list[int]:
    """The API processes' pids, from uvicorn's log lines."""
    return [int(p) for p in re.findall(r"Started server process \[(\d+)\]", server.log())]


@pytest.fixture
def two_apis(demo_model_dir, api_server):
    """The demo model behind two API processes."""
    return api_server(demo_model_dir, "--api-server-count", "2", "--max-num-seqs", "8", "--shutdown-grace", "2")


def _stream(url: str, i: int) -> tuple[str, dict]:
    """One streamed completion on its own connection: its text and its usage."""
    text, usage = [], {}
    with httpx.stream("POST", url + "/v1/completions", timeout=120, json={
            "prompt": f"hello {i}", "max_tokens": 12, "ignore_eos": True, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        chunk = json.loads(line[6:])
        usage = chunk.get("usage") or usage
        text += [c["text"] for c in chunk["choices"]]
    return "".join(text), usage


def test_api_processes_serve_one_engine_and_sum_metrics(two_apis):
    """Two API processes and one core under the supervisor; 12 concurrent streams on separate connections
    each get their whole reply (equal to the same request served alone), and /metrics in whichever
    process answers counts every request of both."""
    assert wait_for(lambda: len(api_pids(two_apis)) == 2, 10)
    assert {core_pid(two_apis), *api_pids(two_apis)} <= set(children(two_apis.proc.pid))
    # (Requests are counted once answered: the readiness polls may still be landing in either process, so the
    # HTTP status counter has no stable start; no completion has run before this point.)
    http_before = metric(two_apis, 'telechat:requests_total{status="200"}', 0.0)
    assert metric(two_apis, 'telechat:request_success_total{finished_reason="length"}', 0.0) == 0
    alone = _stream(two_apis.url, 0)
    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda i: _stream(two_apis.url, i % 3), range(12)))
    assert all(usage["completion_tokens"] == 12 for _, usage in results)
    assert [text for text, _ in results[::3]] == [alone[0]] * 4
    assert wait_for(lambda: metric(two_apis, 'telechat:request_success_total{finished_reason="length"}') == 13, 10)
    assert metric(two_apis, "telechat:generation_tokens_total") == 13 * 12
    # the 13 completions and the /metrics requests before this one
    assert metric(two_apis, 'telechat:requests_total{status="200"}') >= http_before + 15


def test_api_processes_drain_on_sigterm_and_all_exit(two_apis):
    """SIGTERM to the supervisor: every stream ends properly (error event at the grace period, then
    [DONE]), every process of the tree exits, the exit code is 0, no traceback."""
    started = threading.Semaphore(0)
    everyone = tree(two_apis.proc.pid)
    with ThreadPoolExecutor(4) as pool:
        streams = [pool.submit(_read_stream, two_apis.url + CHAT, LONG, started) for _ in range(4)]
        for _ in streams:
            assert started.acquire(timeout=60)
        two_apis.proc.terminate()
        results = [f.result(timeout=60) for f in streams]
    for events in results:
        assert events[-1] == "data: [DONE]"
        assert "shutting down" in json.loads(events[-2][6:])["error"]["message"]
    assert two_apis.proc.wait(60) == 0
    assert wait_for(lambda: not any(running(p) for p in everyone), 20)
    assert "Traceback" not in two_apis.log()


def test_dead_core_gives_503_in_every_api_process(two_apis):
    """The engine core killed: /ready and generation answer 503 with a message saying so; the server
    stays up (as a single API process does) and stops cleanly."""
    os.kill(core_pid(two_apis), signal.SIGKILL)
    def refused() -> bool:
        r = httpx.post(two_apis.url + CHAT, json={"messages": HELLO, "max_tokens": 2}, timeout=30)
        return r.status_code == 503 and "engine" in r.json()["error"]["message"]

    for _ in range(6):  # new connections: both API processes
        assert wait_for(lambda: httpx.get(two_apis.url + "/ready", timeout=10).status_code == 503, 20)
        assert wait_for(refused, 20)
    assert two_apis.stop() == 0


def test_dead_api_process_stops_the_server(two_apis):
    """An API process killed: the supervisor says which, stops the rest and the core, exits 1."""
    everyone = tree(two_apis.proc.pid)
    os.kill(api_pids(two_apis)[0], signal.SIGKILL)
    assert two_apis.proc.wait(60) == 1
    assert wait_for(lambda: not any(running(p) for p in everyone), 20)
    assert "stopping the server" in two_apis.log()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_model_that_cannot_load_is_said_once(demo_model_dir, tmp_path):
    """``--device cuda`` without a GPU: one line says why, once (not once per API process); exit 1."""
    port = free_port()
    proc = subprocess.run([sys.executable, "-m", "services.api", "--model", str(demo_model_dir), "--host", "127.0.0.1",
                           "--port", str(port), "--device", "cuda", "--api-server-count", "2"],
                          capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.count("loading the model failed") == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


def test_api_processes_count_one_capacity_together():
    """Two API processes' states over one shared counter (as the supervisor makes them): capacity is
    MAX_NUM_SEQS + MAX_QUEUE for the server, whichever process takes the requests — the kernel may hand
    one process most connections — and a slot given back in one process can be taken in the other."""
    import multiprocessing

    from services.api.deps import ServerState
    from services.api.protocol.openai import APIError
    from services.api.settings import Settings

    settings = Settings(max_num_seqs=2, max_queue=1, api_server_count=2)
    admitted = multiprocessing.get_context("spawn").Value("i", 0)
    first, second = (ServerState(settings, admitted=admitted) for _ in range(2))
    for _ in range(3):
        first.admit()
    with pytest.raises(APIError) as refused:
        second.admit()
    assert refused.value.status == 429 and "3 requests in flight" in refused.value.message
    first.release()
    second.admit()
    assert (first.in_flight, second.in_flight, admitted.value) == (2, 1, 3)


def test_api_processes_admit_the_whole_capacity(demo_model_dir, api_server):
    """Capacity 3 (2 running + 1 queued) over two API processes: 3 concurrent streams are all served however
    the connections are spread, the 4th at the same time gets 429, and afterwards the slots are free again."""
    server = api_server(demo_model_dir, "--api-server-count", "2", "--max-num-seqs", "2", "--max-queue", "1")
    started = threading.Semaphore(0)
    with ThreadPoolExecutor(3) as pool:
        streams = [pool.submit(_read_stream, server.url + CHAT, {**LONG, "max_tokens": 300}, started)
                   for _ in range(3)]
        for _ in streams:
            assert started.acquire(timeout=60)
        extra = httpx.post(server.url + CHAT, json={"messages": HELLO, "max_tokens": 2}, timeout=60)
        results = [f.result(timeout=120) for f in streams]
    assert extra.status_code == 429 and extra.json()["error"]["code"] == "server_overloaded", extra.text
    assert all(events[-1] == "data: [DONE]" and '"error"' not in "".join(events) for events in results)
    with ThreadPoolExecutor(3) as pool:
        again = list(pool.map(lambda _: httpx.post(server.url + CHAT, json={"messages": HELLO, "max_tokens": 2},
                                                   timeout=60), range(3)))
    assert [r.status_code for r in again] == [200] * 3


@pytest.mark.parametrize("device, cpus, given, expected", [
    ("cuda", 16, None, 4), ("cuda", 64, None, 4), ("cuda", 8, None, 2), ("cuda:1", 2, None, 1),
    ("cpu", 64, None, 1), ("cpu", 64, 3, 3), ("cuda", 16, 1, 1)])
def test_api_server_count_default_follows_the_engine_device_and_cores(monkeypatch, device, cpus, given, expected):
    """Unset: one API process per 4 CPU cores this process may use, at most 4, with the engine on CUDA; 1 on
    CPU (the engine needs the cores); a given count is kept."""
    from services.api.main import api_server_count
    from services.api.settings import Settings

    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(cpus)))
    assert api_server_count(Settings(device=device, api_server_count=given)) == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_api_server_count_default_is_one_without_a_gpu():
    from services.api.main import api_server_count
    from services.api.settings import Settings

    assert Settings().api_server_count is None and api_server_count(Settings()) == 1
