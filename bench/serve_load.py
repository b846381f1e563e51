"""HTTP load benchmark of the API, with the same workload through the engine alone as its baseline.

For each concurrency level, ``--requests`` requests (default 2 x concurrency, at least 8) go to
``/v1/completions`` with a fixed ``--prompt-len`` token-id prompt and a fixed ``--output-len``
(``ignore_eos``), at most ``concurrency`` in flight. Measured per level: time to first token
(p50/p99, first SSE chunk), inter-token latency (mean = time per output token after the first;
p99 of gaps between chunks), output tok/s over the level's wall time. Then the same requests go
through ``Runtime.stream`` in this process (no HTTP) and the API overhead ratio is
``1 - api_tok_s / engine_tok_s``. One JSON line per measurement, then a Markdown table.

    python bench/serve_load.py                                   # demo model, CPU-sized defaults
    python bench/serve_load.py --random-weights 7B --concurrency 1,8,32,64 --prompt-len 512 --output-len 256
    python bench/serve_load.py --model /models/TeleChat-12B --url http://host:8070   # an already running server

On a CPU box the client, the server and the engine share the cores: the overhead ratio there
includes the client's own CPU use.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RESULTS: list[dict] = []


def record(**row) -> None:
    """Print one measurement as a JSON line and keep it for the table."""
    RESULTS.append(row)
    print(json.dumps(row), flush=True)


def pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by nearest rank; 0 for no values."""
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


# ---------------------------------------------------------------------------------------------- model

def random_weights_model(preset_name: str, out: Path) -> Path:
    """A random-init checkpoint of a released shape with the demo tokenizer.

    The ``lm_head`` rows past the tokenizer's vocabulary are zeroed, so greedy picks tokens the
    tokenizer can decode while every step still computes the full-vocabulary head.
    """
    import torch

    from telechat.model.config import preset
    from telechat.model.modeling import TelechatForCausalLM
    from telechat.tokenizer import build_demo_tokenizer, load_tokenizer

    special = build_demo_tokenizer(out)
    n_tok = len(load_tokenizer(out))
    config = preset(preset_name, bos_token_id=special["bos_token_id"], eos_token_id=special["eos_token_id"],
                    pad_token_id=special["pad_token_id"], architectures=["TelechatForCausalLM"], seq_length=8192)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = TelechatForCausalLM(config).to(torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    with torch.no_grad():
        model.get_output_embeddings().weight[n_tok:] = 0
    model.save_pretrained(out)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the server subprocess sizes its KV pool from free GPU memory
    (out / "generation_config.json").write_text(json.dumps({"do_sample": False, **special}), encoding="utf-8")
    return out


def prompts(n: int, length: int, vocab: int) -> list[list[int]]:
    """``n`` distinct token-id prompts of ``length`` ids (no special tokens: ids from 16 up)."""
    return [[16 + (i * 7919 + j * 104729) % (vocab - 16) for j in range(length)] for i in range(n)]


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
    return {"start": t0, "stamps": stamps, "tokens": tokens}


async def run_http(url: str, reqs: list[list[int]], concurrency: int, output_len: int) -> list[dict]:
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def guarded(p):
            async with sem:
                return await one_http(client, url, p, output_len)
        return await asyncio.gather(*(guarded(p) for p in reqs))


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


def summarize(mode: str, concurrency: int, results: list[dict], wall: float, args) -> dict:
    ttft = [(r["stamps"][0] - r["start"]) * 1e3 for r in results if r["stamps"]]
    tpot = [(r["stamps"][-1] - r["stamps"][0]) * 1e3 / (r["tokens"] - 1) for r in results
            if len(r["stamps"]) > 1 and r["tokens"] > 1]
    gaps = [(b - a) * 1e3 for r in results for a, b in zip(r["stamps"], r["stamps"][1:])]
    tokens = sum(r["tokens"] for r in results)
    row = dict(bench="serve_load", mode=mode, concurrency=concurrency, requests=len(results),
               prompt_len=args.prompt_len, output_len=args.output_len,
               ttft_p50_ms=round(pct(ttft, 0.5), 2), ttft_p99_ms=round(pct(ttft, 0.99), 2),
               itl_mean_ms=round(statistics.fmean(tpot), 2) if tpot else 0.0, itl_p99_ms=round(pct(gaps, 0.99), 2),
               output_tok_s=round(tokens / wall, 1), wall_s=round(wall, 2))
    record(**row)
    return row


# ---------------------------------------------------------------------------------------------- main

def start_server(model: Path, max_num_seqs: int, args) -> tuple[subprocess.Popen, str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "services.api", "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
           "--max-num-seqs", str(max_num_seqs), "--max-queue", "4096", "--log-level", "warning"]
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the API server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise SystemExit("the API server did not become ready in 600 s")


def table(rows: list[dict]) -> str:
    by = {(r["mode"], r["concurrency"]): r for r in rows}
    lines = ["| concurrency | API TTFT p50 / p99 (ms) | API ITL mean / p99 (ms) | API out tok/s | engine out tok/s "
             "| engine TTFT p50 (ms) | API overhead |", "|---|---|---|---|---|---|---|"]
    for c in sorted({r["concurrency"] for r in rows}):
        a, e = by.get(("api", c)), by.get(("engine", c))
        if not a:
            continue
        overhead = f"{1 - a['output_tok_s'] / e['output_tok_s']:.1%}" if e else "-"
        lines.append(f"| {c} | {a['ttft_p50_ms']} / {a['ttft_p99_ms']} | {a['itl_mean_ms']} / {a['itl_p99_ms']} "
                     f"| {a['output_tok_s']} | {e['output_tok_s'] if e else '-'} "
                     f"| {e['ttft_p50_ms'] if e else '-'} | {overhead} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint folder (default: the built-in demo model)")
    p.add_argument("--random-weights", metavar="PRESET", help="random-init model of a released shape (7B, 12B, 1B) "
                   "with the demo tokenizer, written to a temporary folder")
    p.add_argument("--url", help="benchmark this running server instead of starting one (engine baseline still "
                   "runs here unless --no-engine)")
    p.add_argument("--concurrency", default="1,8,32,64", help="comma-separated levels")
    p.add_argument("--requests", type=int, default=None, help="requests per level (default 2 x concurrency, >= 8)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--dtype", default=None, help="auto | bfloat16 | float16 | float32")
    p.add_argument("--no-engine", action="store_true", help="skip the engine-alone baseline")
    args = p.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    from telechat.runtime import resolve_model_path

    tmp = None
    if args.random_weights:
        tmp = tempfile.TemporaryDirectory(prefix="telechat-bench-")
        model = random_weights_model(args.random_weights, Path(tmp.name))
    else:
        model, _ = resolve_model_path(args.model)
    from telechat.tokenizer import load_tokenizer

    vocab = len(load_tokenizer(model))
    workloads = {c: prompts(args.requests or max(8, 2 * c), args.prompt_len, vocab) for c in levels}

    proc, url = (None, args.url) if args.url else start_server(model, max(levels), args)
    try:
        asyncio.run(run_http(url, workloads[levels[0]][:2], levels[0], 4))  # warm-up
        for c in levels:
            t0 = time.perf_counter()
            res = asyncio.run(run_http(url, workloads[c], c, args.output_len))
            summarize("api", c, res, time.perf_counter() - t0, args)
    finally:
        if proc:
            proc.terminate()
            proc.wait(120)

    if not args.no_engine:
        from telechat.engine.engine import EngineConfig
        from telechat.runtime import Runtime

        rt = Runtime.load(model, dtype=args.dtype or "auto", engine_config=EngineConfig(max_num_seqs=max(levels)))
        try:
            asyncio.run(run_engine(rt, workloads[levels[0]][:2], levels[0], 4))
            for c in levels:
                t0 = time.perf_counter()
                res = asyncio.run(run_engine(rt, workloads[c], c, args.output_len))
                summarize("engine", c, res, time.perf_counter() - t0, args)
        finally:
            rt.engine.shutdown(0)
    print()
    print(table(RESULTS))
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
