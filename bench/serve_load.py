"""HTTP load benchmark of the API, with the same workload through the engine alone as its baseline.

For each concurrency level, ``--requests`` requests (default 2 x concurrency, at least 8) go to
``/v1/completions`` with a fixed ``--prompt-len`` token-id prompt and a fixed ``--output-len``
(``ignore_eos``), at most ``concurrency`` in flight. Measured per level: time to first token
(p50/p99, first SSE chunk), inter-token latency (mean = time per output token after the first;
p99 of gaps between chunks), output tok/s over the level's wall time. Then the same requests go
through ``Runtime.stream`` in this process (no HTTP) and the API overhead ratio is
``1 - api_tok_s / engine_tok_s``. Every prompt is distinct (a prefix cache serves none of them
from another). One JSON line per measurement, then a Markdown table; ``--json PATH`` also writes
them with date, command, commit, device and torch version.

Multi-turn chat (``--multi-turn``, HTTP only): per concurrency level, that many chat sessions at
once, each ``--turns`` turns streamed from ``/v1/chat/completions``. A session starts from its own
``--history-tokens`` system prompt; every turn resends the whole conversation (as the web UI and
OpenAI clients do) with a new ``--user-tokens`` user message and appends the reply. Measured per
turn: TTFT (first content chunk), per-stream decode tok/s, prompt tokens and, when the server
reports ``usage.prompt_tokens_details.cached_tokens``, the cached share. Then, in the same run and
at the same concurrency, as many clients each send ``--turns`` fresh ``--fresh-tokens`` prompts:
``prefix_ttft_ratio`` = TTFT p50 of turns >= 2 (history in the server's prefix cache) / TTFT p50
of the fresh prompts. Text sizes are calibrated from the server's own ``usage.prompt_tokens``.

    python bench/serve_load.py                                   # demo model, CPU-sized defaults
    python bench/serve_load.py --random-weights 7B --concurrency 1,8,32,64 --prompt-len 512 --output-len 256
    python bench/serve_load.py --model /models/TeleChat-12B --url http://host:8070   # an already running server
    python bench/serve_load.py --random-weights 7B --multi-turn --concurrency 1,16 --json multi_turn.json

On a CPU box the client, the server and the engine share the cores: the overhead ratio there
includes the client's own CPU use.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.random_checkpoint import PRESET_NAMES, write_random_checkpoint  # noqa: E402
from bench.report import write_json  # noqa: E402

RESULTS: list[dict] = []
JSON_PATH: Path | None = None
META: dict = {}
"""Extra provenance for ``--json`` (the server's URL or the model folder)."""


class BenchError(RuntimeError):
    """A request the server refused or failed; the message is one line."""


def record(**row) -> None:
    """Print one measurement as a JSON line, keep it for the table and rewrite ``--json`` (partial runs keep it)."""
    RESULTS.append(row)
    print(json.dumps(row), flush=True)
    if JSON_PATH:
        write_json(JSON_PATH, RESULTS, **META)


def pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by nearest rank; 0 for no values."""
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def prompts(n: int, length: int, vocab: int, first: int = 0) -> list[list[int]]:
    """Prompts ``first .. first + n - 1`` of ``length`` ids (no special tokens: ids from 16 up); distinct
    from their first token on, so no two share a cached block."""
    return [[16 + (i * 7919 + j * 104729) % (vocab - 16) for j in range(length)] for i in range(first, first + n)]


# ---------------------------------------------------------------------------------------------- HTTP

async def one_http(client: httpx.AsyncClient, url: str, prompt: list[int], output_len: int) -> dict:
    body = {"prompt": prompt, "max_tokens": output_len, "ignore_eos": True, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    stamps, tokens = [], 0
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["text"]:
                stamps.append(time.perf_counter())
    return {"start": t0, "end": time.perf_counter(), "stamps": stamps, "tokens": tokens}


async def run_http(url: str, reqs: list[list[int]], concurrency: int, output_len: int) -> list[dict]:
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def guarded(p):
            async with sem:
                return await one_http(client, url, p, output_len)
        return await asyncio.gather(*(guarded(p) for p in reqs))


def _client_share(url: str, reqs: list[list[int]], concurrency: int, output_len: int, start_at: float
                  ) -> tuple[list[dict], float]:
    """One client process's part of a level: wait for the common start, run it; results and CPU seconds."""
    time.sleep(max(0.0, start_at - time.perf_counter()))
    cpu = time.process_time()
    results = asyncio.run(run_http(url, reqs, concurrency, output_len))
    return results, time.process_time() - cpu


def http_level(url: str, reqs: list[list[int]], concurrency: int, output_len: int, clients: int = 1
               ) -> tuple[list[dict], float, float]:
    """One level's requests over ``clients`` client processes (each its share of the requests and of the
    concurrency; one: in this process). Returns the results, the wall time from the first request's
    start to the last one's end, and the clients' CPU seconds (client-bound when near ``clients`` x wall)."""
    clients = max(1, min(clients, concurrency))
    if clients == 1:
        results, cpu = _client_share(url, reqs, concurrency, output_len, 0.0)
    else:
        shares = [(reqs[i::clients], concurrency // clients + (i < concurrency % clients)) for i in range(clients)]
        # perf_counter is the system's monotonic clock on Linux: comparable across the client processes
        start_at = time.perf_counter() + 2.0
        with ProcessPoolExecutor(clients, mp_context=multiprocessing.get_context("fork")) as pool:
            parts = list(pool.map(_client_share, *zip(*[(url, r, c, output_len, start_at) for r, c in shares])))
        results, cpu = [r for rs, _ in parts for r in rs], sum(c for _, c in parts)
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    return results, wall, cpu


# ---------------------------------------------------------------------------------------------- engine alone

async def run_engine(rt, reqs: list[list[int]], concurrency: int, output_len: int) -> list[dict]:
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int, prompt: list[int]) -> dict:
        async with sem:
            params = rt.sampling_params(max_tokens=output_len, temperature=0.0, ignore_eos=True)
            t0 = time.perf_counter()
            stamps, tokens = [], 0
            async for d in rt.stream(prompt, params, f"bench-{concurrency}-{i}"):
                if d.text:
                    stamps.append(time.perf_counter())
                tokens = d.completion_tokens
            return {"start": t0, "stamps": stamps, "tokens": tokens}

    return await asyncio.gather(*(one(i, p) for i, p in enumerate(reqs)))


def summarize(mode: str, concurrency: int, results: list[dict], wall: float, args, **extra) -> dict:
    ttft = [(r["stamps"][0] - r["start"]) * 1e3 for r in results if r["stamps"]]
    tpot = [(r["stamps"][-1] - r["stamps"][0]) * 1e3 / (r["tokens"] - 1) for r in results
            if len(r["stamps"]) > 1 and r["tokens"] > 1]
    gaps = [(b - a) * 1e3 for r in results for a, b in zip(r["stamps"], r["stamps"][1:])]
    tokens = sum(r["tokens"] for r in results)
    row = dict(bench="serve_load", mode=mode, concurrency=concurrency, requests=len(results),
               prompt_len=args.prompt_len, output_len=args.output_len,
               ttft_p50_ms=round(pct(ttft, 0.5), 2), ttft_p99_ms=round(pct(ttft, 0.99), 2),
               ttft_mean_ms=round(statistics.fmean(ttft), 2) if ttft else 0.0, itl_mean_ms=round(statistics.fmean(tpot), 2) if tpot else 0.0, itl_p99_ms=round(pct(gaps, 0.99), 2),
               output_tok_s=round(tokens / wall, 1), wall_s=round(wall, 2), **extra)
    record(**row)
    return row


# ---------------------------------------------------------------------------------------------- multi-turn chat

SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
CALIBRATION_WORDS = 200


def words(n: int, seed: str) -> str:
    """``n`` pseudo-words (1-3 syllables each), the same for the same seed."""
    rng = random.Random(seed)
    return " ".join("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(n))


async def chat_stream(client: httpx.AsyncClient, url: str, messages: list[dict], output_len: int) -> dict:
    """One streamed chat completion: start time, content-chunk times, reply text and usage figures."""
    body = {"messages": messages, "max_tokens": output_len, "ignore_eos": True, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    stamps, parts, usage = [], [], {}
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            raise BenchError(f"/v1/chat/completions answered {r.status_code}: {r.text[:300]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("error"):
                raise BenchError(f"/v1/chat/completions stream failed: {json.dumps(chunk['error'])[:300]}")
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or ():
                text = (choice.get("delta") or {}).get("content")
                if text:
                    stamps.append(time.perf_counter())
                    parts.append(text)
    details = usage.get("prompt_tokens_details") or {}
    return {"start": t0, "stamps": stamps, "text": "".join(parts), "tokens": usage.get("completion_tokens", 0),
            "prompt_tokens": usage.get("prompt_tokens"), "cached_tokens": details.get("cached_tokens")}


async def prompt_tokens(client: httpx.AsyncClient, url: str, text: str) -> int:
    """Prompt tokens the server counts for ``text`` as the one user message."""
    r = await chat_stream(client, url, [{"role": "user", "content": text}], 1)
    if r["prompt_tokens"] is None:
        raise BenchError("the server reports no usage.prompt_tokens with stream_options.include_usage")
    return r["prompt_tokens"]


async def calibrate(client: httpx.AsyncClient, url: str) -> tuple[float, float]:
    """(prompt tokens per pseudo-word, tokens of the chat template around one user message)."""
    one = await prompt_tokens(client, url, words(1, "calibrate-1"))
    many = await prompt_tokens(client, url, words(CALIBRATION_WORDS, "calibrate-2"))
    per_word = (many - one) / (CALIBRATION_WORDS - 1)
    if per_word <= 0:
        raise BenchError(f"cannot size prompts: {CALIBRATION_WORDS} words counted as {many} tokens, one as {one}")
    return per_word, max(0.0, one - per_word)


async def chat_session(client: httpx.AsyncClient, url: str, seed: str, sizes: dict, turns: int,
                       output_len: int) -> list[dict]:
    """One session: a long system prompt, then ``turns`` turns, each resending the conversation so far."""
    messages = [{"role": "system", "content": words(sizes["history_words"], f"{seed}-history")}]
    results = []
    for turn in range(1, turns + 1):
        messages.append({"role": "user", "content": words(sizes["user_words"], f"{seed}-user-{turn}")})
        r = await chat_stream(client, url, messages, output_len)
        messages.append({"role": "assistant", "content": r["text"]})
        results.append({**r, "turn": turn})
    return results


async def fresh_client(client: httpx.AsyncClient, url: str, seed: str, sizes: dict, n: int,
                       output_len: int) -> list[dict]:
    """``n`` fresh short prompts one after another (no history, nothing cached)."""
    return [await chat_stream(client, url, [{"role": "user", "content": words(sizes["fresh_words"], f"{seed}-{i}")}],
                              output_len) for i in range(n)]


async def run_multi_turn(url: str, sessions: int, args) -> tuple[list[dict], float, list[dict], float, dict]:
    """Sessions first, then the fresh prompts at the same concurrency; each list with its wall time, and
    the server's own times of each phase (:func:`server_time_split`, keys prefixed ``sessions_`` and
    ``fresh_``)."""
    limits = httpx.Limits(max_connections=sessions + 1, max_keepalive_connections=sessions + 1)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        per_word, template = await calibrate(client, url)
        sizes = {"history_words": max(1, round(args.history_tokens / per_word)),
                 "user_words": max(1, round(args.user_tokens / per_word)),
                 "fresh_words": max(1, round((args.fresh_tokens - template) / per_word))}
        await chat_stream(client, url, [{"role": "user", "content": words(8, f"warm-{sessions}")}], 4)
        marks = [server_times(url)]
        t0 = time.perf_counter()
        chats = await asyncio.gather(*(chat_session(client, url, f"s{sessions}-{i}", sizes, args.turns,
                                                    args.output_len) for i in range(sessions)))
        chat_wall = time.perf_counter() - t0
        marks.append(server_times(url))
        t0 = time.perf_counter()
        fresh = await asyncio.gather(*(fresh_client(client, url, f"f{sessions}-{i}", sizes, args.turns,
                                                    args.output_len) for i in range(sessions)))
        fresh_wall = time.perf_counter() - t0
        marks.append(server_times(url))
    server = {f"{phase}_{k}": v for phase, (a, b) in (("sessions", marks[:2]), ("fresh", marks[1:]))
              for k, v in server_time_split(a, b).items()}
    return [r for s in chats for r in s], chat_wall, [r for c in fresh for r in c], fresh_wall, server


def ttft_ms(results: list[dict]) -> list[float]:
    """Time to the first content chunk of each request that produced text, in ms."""
    return [(r["stamps"][0] - r["start"]) * 1e3 for r in results if r["stamps"]]


def stream_tok_s(results: list[dict]) -> list[float]:
    """Decode speed of each stream after its first chunk (tokens per second)."""
    return [(r["tokens"] - 1) / (r["stamps"][-1] - r["stamps"][0]) for r in results
            if r["tokens"] > 1 and len(r["stamps"]) > 1 and r["stamps"][-1] > r["stamps"][0]]


def cached_fraction(results: list[dict]) -> float | None:
    """Share of prompt tokens served from the prefix cache; None when the server does not report it."""
    if not results or any(r["cached_tokens"] is None or r["prompt_tokens"] is None for r in results):
        return None
    return round(sum(r["cached_tokens"] for r in results) / max(1, sum(r["prompt_tokens"] for r in results)), 4)


def mean_prompt_tokens(results: list[dict]) -> float | None:
    """Mean prompt tokens the server reported; None when it reported none."""
    counts = [r["prompt_tokens"] for r in results if r["prompt_tokens"] is not None]
    return round(statistics.fmean(counts), 1) if counts else None


def multi_turn_rows(sessions: int, turns: list[dict], wall: float, fresh: list[dict], fresh_wall: float
                    ) -> tuple[list[dict], dict]:
    """Per-turn rows and the summary row of one concurrency level (``turns`` carry their ``turn`` number)."""
    per_turn = []
    for t in sorted({r["turn"] for r in turns}):
        rs = [r for r in turns if r["turn"] == t]
        ttft, speed = ttft_ms(rs), stream_tok_s(rs)
        per_turn.append(dict(
            bench="serve_load", mode="multi_turn_turn", sessions=sessions, turn=t,
            prompt_tokens_mean=mean_prompt_tokens(rs),
            cached_fraction=cached_fraction(rs), ttft_p50_ms=round(pct(ttft, 0.5), 2),
            ttft_p99_ms=round(pct(ttft, 0.99), 2),
            stream_tok_s_mean=round(statistics.fmean(speed), 1) if speed else 0.0))
    later = [r for r in turns if r["turn"] >= 2]
    cached_ttft, fresh_ttft = ttft_ms(later), ttft_ms(fresh)
    cached_p50, fresh_p50 = pct(cached_ttft, 0.5), pct(fresh_ttft, 0.5)
    cached_p99, fresh_p99 = pct(cached_ttft, 0.99), pct(fresh_ttft, 0.99)
    first = [r for r in turns if r["turn"] == 1]
    max_turn = max((r["turn"] for r in turns), default=0)
    summary = dict(
        bench="serve_load", mode="multi_turn", sessions=sessions, turns=max_turn,
        first_turn_prompt_tokens=mean_prompt_tokens(first),
        last_turn_prompt_tokens=mean_prompt_tokens([r for r in turns if r["turn"] == max_turn]),
        fresh_prompt_tokens=mean_prompt_tokens(fresh),
        first_turn_ttft_p50_ms=round(pct(ttft_ms(first), 0.5), 2),
        cached_ttft_p50_ms=round(cached_p50, 2), cached_ttft_p99_ms=round(cached_p99, 2),
        fresh_ttft_p50_ms=round(fresh_p50, 2), fresh_ttft_p99_ms=round(fresh_p99, 2),
        prefix_ttft_ratio=round(cached_p50 / fresh_p50, 3) if fresh_p50 else None,
        prefix_ttft_ratio_p99=round(cached_p99 / fresh_p99, 3) if fresh_p99 else None,
        cached_fraction=cached_fraction(later),
        output_tok_s=round(sum(r["tokens"] for r in turns) / wall, 1) if wall else 0.0,
        fresh_output_tok_s=round(sum(r["tokens"] for r in fresh) / fresh_wall, 1) if fresh_wall else 0.0,
        wall_s=round(wall, 2), fresh_wall_s=round(fresh_wall, 2))
    return per_turn, summary


def multi_turn_table(rows: list[dict]) -> str:
    lines = ["| sessions | turn-1 prompt tokens | turn-1 TTFT p50 (ms) | turns >= 2 TTFT p50 / p99 (ms) "
             "| fresh TTFT p50 / p99 (ms) | prefix TTFT ratio | cached share | out tok/s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["mode"] == "multi_turn":
            lines.append(f"| {r['sessions']} | {r['first_turn_prompt_tokens']} | {r['first_turn_ttft_p50_ms']} "
                         f"| {r['cached_ttft_p50_ms']} / {r['cached_ttft_p99_ms']} "
                         f"| {r['fresh_ttft_p50_ms']} / {r['fresh_ttft_p99_ms']} | {r['prefix_ttft_ratio']} "
                         f"| {r['cached_fraction'] if r['cached_fraction'] is not None else '-'} "
                         f"| {r['output_tok_s']} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- server

def start_server(model: Path, max_num_seqs: int, dtype: str | None = None, ready_timeout: float = 600,
                 extra_args: list[str] | None = None) -> tuple[subprocess.Popen, str]:
    """Start ``python -m services.api`` (= ``telechat serve``, with ``extra_args``) on a free loopback port;
    return it and its URL once ``/ready`` answers 200."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "services.api", "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
           "--max-num-seqs", str(max_num_seqs), "--max-queue", "4096", "--log-level", "warning"]
    if dtype:
        cmd += ["--dtype", dtype]
    cmd += extra_args or []
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the API server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(proc)
    raise SystemExit(f"the API server did not become ready in {ready_timeout:.0f} s")


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL if it has not exited after 120 s."""
    proc.terminate()
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------------------------------------- main

def table(rows: list[dict]) -> str:
    by = {(r["mode"], r["concurrency"]): r for r in rows if r["mode"] in ("api", "engine")}
    lines = ["| concurrency | API TTFT p50 / p99 (ms) | API ITL mean / p99 (ms) | API out tok/s | engine out tok/s "
             "| engine TTFT p50 (ms) | API overhead |", "|---|---|---|---|---|---|---|"]
    for c in sorted({c for _, c in by}):
        a, e = by.get(("api", c)), by.get(("engine", c))
        if not a:
            continue
        overhead = f"{1 - a['output_tok_s'] / e['output_tok_s']:.1%}" if e else "-"
        lines.append(f"| {c} | {a['ttft_p50_ms']} / {a['ttft_p99_ms']} | {a['itl_mean_ms']} / {a['itl_p99_ms']} "
                     f"| {a['output_tok_s']} | {e['output_tok_s'] if e else '-'} "
                     f"| {e['ttft_p50_ms'] if e else '-'} | {overhead} |")
    return "\n".join(lines)


SERVER_TIMES = {"ttft": "telechat:time_to_first_token_seconds", "queue": "telechat:request_queue_time_seconds",
                "prefill": "telechat:request_prefill_time_seconds"}
"""The server's own latency histograms a level reads: TTFT from admission (after parsing and tokenizing) to
the first streamed text, and the engine's share of it — waiting for the running batch, then prefill."""


def server_times(url: str) -> dict[str, dict[float, float]]:
    """Per :data:`SERVER_TIMES` key: the histogram's cumulative count per bucket bound, plus its sum and
    count under the keys -1 and -2 (empty when the server does not export it)."""
    from prometheus_client.parser import text_string_to_metric_families

    names = {v: k for k, v in SERVER_TIMES.items()}
    out: dict[str, dict[float, float]] = {k: {} for k in SERVER_TIMES}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        if family.name not in names:
            continue
        h = out[names[family.name]]
        for s in family.samples:
            if s.name.endswith("_bucket"):
                h[float(s.labels["le"])] = s.value
            elif s.name.endswith("_sum"):
                h[-1] = s.value
            elif s.name.endswith("_count"):
                h[-2] = s.value
    return out


def server_time_split(before: dict[str, dict[float, float]], after: dict[str, dict[float, float]]) -> dict:
    """What the server saw of a level: mean TTFT, queue and prefill time, and the TTFT bucket bound
    holding the 99th percentile."""
    row = {}
    for key, a in after.items():
        b = before.get(key, {})
        n = a.get(-2, 0) - b.get(-2, 0)
        if n <= 0:
            continue
        row[f"server_{key}_mean_ms"] = round((a[-1] - b.get(-1, 0)) / n * 1e3, 2)
        if key == "ttft":
            bounds = sorted(x for x in a if x >= 0)
            p99 = next((x for x in bounds if a[x] - b.get(x, 0) >= 0.99 * n), math.inf)
            row["server_ttft_p99_le_ms"] = None if math.isinf(p99) else round(p99 * 1e3, 1)
    return row


def load_levels(url: str, workloads: dict[int, list[list[int]]], warmup: list[list[int]], args) -> None:
    """The ``/v1/completions`` load test, one row per level; with the server's own TTFT of the level and
    the engine's queue and prefill share of it beside the clients' TTFT (the difference: HTTP, parsing and
    tokenizing, and the clients)."""
    asyncio.run(run_http(url, warmup, len(warmup), 4))
    for c, reqs in workloads.items():
        before = server_times(url)
        res, wall, cpu = http_level(url, reqs, c, args.output_len, args.clients)
        summarize("api", c, res, wall, args, clients=max(1, min(args.clients, c)),
                  client_cpu_share=round(cpu / wall / max(1, min(args.clients, c)), 3),
                  **server_time_split(before, server_times(url)))


def multi_turn_levels(url: str, levels: list[int], args) -> None:
    """The multi-turn chat test, per-turn rows and a summary row per level."""
    for sessions in levels:
        turns, wall, fresh, fresh_wall, server = asyncio.run(run_multi_turn(url, sessions, args))
        per_turn, summary = multi_turn_rows(sessions, turns, wall, fresh, fresh_wall)
        for row in per_turn:
            record(**row)
        record(**summary, **server)


def engine_levels(model: Path, workloads: dict[int, list[list[int]]], warmup: list[list[int]], args) -> None:
    """The same requests through ``Runtime.stream`` in this process (no HTTP)."""
    from telechat.engine.core import EngineConfig
    from telechat.runtime import Runtime

    rt = Runtime.load(model, dtype=args.dtype or "auto", engine_config=EngineConfig(max_num_seqs=max(workloads)))
    try:
        asyncio.run(run_engine(rt, warmup, len(warmup), 4))
        for c, reqs in workloads.items():
            t0 = time.perf_counter()
            res = asyncio.run(run_engine(rt, reqs, c, args.output_len))
            summarize("engine", c, res, time.perf_counter() - t0, args)
    finally:
        rt.engine.shutdown(0)


def main() -> None:
    global JSON_PATH
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint folder (default: the built-in demo model)")
    p.add_argument("--random-weights", metavar="PRESET", choices=PRESET_NAMES,
                   help="random-init model of a released shape (7B, 12B, 1B; tiny for CPU smoke runs) with the "
                   "demo tokenizer, written to a temporary folder")
    p.add_argument("--url", help="benchmark this running server instead of starting one (engine baseline still "
                   "runs here unless --no-engine)")
    p.add_argument("--concurrency", default="1,8,32,64", help="comma-separated levels (with --multi-turn: sessions)")
    p.add_argument("--requests", type=int, default=None, help="requests per level (default 2 x concurrency, >= 8)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128, help="tokens per reply (with --multi-turn: per turn)")
    p.add_argument("--dtype", default=None, help="auto | bfloat16 | float16 | float32")
    p.add_argument("--clients", type=int, default=1, help="client processes sharing each level (one Python "
                   "process parsing thousands of SSE events per second can be the bottleneck; see client_cpu_share)")
    p.add_argument("--no-engine", action="store_true", help="skip the engine-alone baseline")
    p.add_argument("--multi-turn", action="store_true", help="chat sessions over a long history instead of the "
                   "completions load test (HTTP only, no engine baseline)")
    p.add_argument("--turns", type=int, default=10, help="turns per session (--multi-turn)")
    p.add_argument("--history-tokens", type=int, default=4096, help="system prompt of each session (--multi-turn)")
    p.add_argument("--user-tokens", type=int, default=32, help="new user message per turn (--multi-turn)")
    p.add_argument("--fresh-tokens", type=int, default=128, help="fresh prompt compared with (--multi-turn)")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the results here (rewritten after each)")
    args = p.parse_args()
    levels = [int(c) for c in args.concurrency.split(",") if c]
    JSON_PATH = args.json

    tmp = None
    if args.random_weights:
        tmp = tempfile.TemporaryDirectory(prefix="telechat-bench-")
        model = write_random_checkpoint(args.random_weights, Path(tmp.name))
    elif args.url and args.multi_turn:
        model = None  # text prompts: no tokenizer needed here
    else:
        from telechat.runtime import resolve_model_path

        model, _ = resolve_model_path(args.model)
    META.update({"url": args.url} if args.url else
                {"model": f"random-init {args.random_weights}" if args.random_weights else str(model)})
    workloads, warmup = {}, []
    if not args.multi_turn:
        from telechat.tokenizer import load_tokenizer

        vocab = len(load_tokenizer(model))
        first = 0
        for c in levels:
            n = args.requests or max(8, 2 * c)
            workloads[c] = prompts(n, args.prompt_len, vocab, first)
            first += n
        warmup = prompts(2, args.prompt_len, vocab, first)

    proc, url = (None, args.url) if args.url else start_server(model, max(levels), args.dtype)
    try:
        if args.multi_turn:
            multi_turn_levels(url, levels, args)
        else:
            load_levels(url, workloads, warmup, args)
    except (BenchError, httpx.HTTPError) as e:
        raise SystemExit(f"serve_load: {e}") from None
    finally:
        if proc:
            stop_server(proc)

    if not args.multi_turn and not args.no_engine:
        engine_levels(model, workloads, warmup, args)
    print()
    print(multi_turn_table(RESULTS) if args.multi_turn else table(RESULTS))
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
