"""Where the time of the served path goes: py-spy samples of the API and engine-core processes under a
load level, or a cProfile of the engine's own loop at the same load.

    python bench/profile_serve.py --model /tmp/telechat-bench/7B --concurrency 64 --clients 4
    python bench/profile_serve.py --model /tmp/telechat-bench/7B --engine-only --concurrency 64

Served mode starts ``python -m services.api`` (extra server flags after ``--``), runs one warm-up level and
then one ``/v1/completions`` level (bench/serve_load.py's workload) while ``py-spy record`` samples every
server process (the API process or processes, and the engine core); for each process it prints the
functions with the most samples on top of the stack (self) and anywhere in it (inclusive), as shares of
that process's samples, idle samples included (``--idle``): a process that is idle half the time shows it.
Engine-only mode steps ``LLMEngine`` directly (bench/engine.py's ``run_requests``) under cProfile and
prints the top functions by own time: host work that the device's step does not hide shows up here.
py-spy needs ptrace rights over the server (root, or ``kernel.yama.ptrace_scope`` 0).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.serve_load import http_level, prompts, run_http, start_server, stop_server  # noqa: E402

TOP = 25


def descendants(pid: int) -> list[int]:
    """``pid``'s child processes, recursively (from /proc; children of every thread)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids = [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
        for kid in kids:
            found += [kid, *descendants(kid)]
    return found


def process_name(pid: int) -> str:
    """The process's command line, shortened."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        cmd = "?"
    return f"{pid} {cmd[:100]}"


def summarize_raw(path: Path, seconds: float, rate: int) -> str:
    """Top self and inclusive frames of a py-spy ``--format raw`` file (collapsed stacks with counts)."""
    self_counts: Counter = Counter()
    incl: Counter = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [f for f in stack.split(";") if f]
        if frames:
            self_counts[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    if not total:
        return "  (no samples)"
    lines = [f"  {total} samples = {100 * total / (seconds * rate):.0f}% of {seconds:.0f} s at {rate}/s", "  self:"]
    lines += [f"    {100 * n / total:5.1f}%  {f[:150]}" for f, n in self_counts.most_common(TOP)]
    lines.append("  inclusive:")
    lines += [f"    {100 * n / total:5.1f}%  {f[:150]}" for f, n in incl.most_common(TOP)]
    return "\n".join(lines)


def served(args, extra: list[str]) -> None:
    """Start the server, sample its processes during one load level, print the profiles."""
    from telechat.tokenizer import load_tokenizer

    spy = shutil.which("py-spy")
    if not spy:
        raise SystemExit("profile_serve: py-spy is not installed (pip install py-spy)")
    vocab = len(load_tokenizer(args.model))
    proc, url = start_server(args.model, args.concurrency, extra_args=extra)
    out = Path(tempfile.mkdtemp(prefix="profile-serve-"))
    try:
        asyncio.run(run_http(url, prompts(args.concurrency, args.prompt_len, vocab, 2 * 10**6), args.concurrency, 8))
        pids = [proc.pid, *descendants(proc.pid)]
        for level, clients in enumerate(int(c) for c in args.clients.split(",")):
            reqs = prompts(args.requests or 2 * args.concurrency, args.prompt_len, vocab, 10**6 * (3 + level))
            spies = {pid: subprocess.Popen(
                [spy, "record", "--format", "raw", "--nonblocking", "--rate", str(args.rate), "--duration",
                 str(args.duration), "--pid", str(pid), "--output", str(out / f"{pid}-{level}.txt"),
                 *(["--idle"] if args.idle else [])], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                for pid in pids}
            time.sleep(1.0)  # py-spy attached
            results, wall, cpu = http_level(url, reqs, args.concurrency, args.output_len, clients)
            tokens = sum(r["tokens"] for r in results)
            print(f"\n### level: {len(results)} requests at {args.concurrency} concurrent, {clients} client "
                  f"process(es): {tokens / wall:.1f} output tok/s, wall {wall:.2f} s, client CPU {cpu:.2f} s")
            for pid, spy_proc in spies.items():
                _, err = spy_proc.communicate()
                path = out / f"{pid}-{level}.txt"
                print(f"\n== {process_name(pid)}")
                print(summarize_raw(path, args.duration, args.rate) if path.exists()
                      else f"  py-spy failed: {err.decode(errors='replace')[-300:]}")
    finally:
        stop_server(proc)
        shutil.rmtree(out, ignore_errors=True)


def engine_only(args) -> None:
    """cProfile of the engine stepping the level's requests in this process."""
    import torch

    from bench.engine import level_prompts, run_requests
    from telechat.engine.core import EngineConfig, LLMEngine
    from telechat.model.checkpoint import inspect_checkpoint
    from telechat.model.loader import load_model

    model = load_model(inspect_checkpoint(args.model), device="cuda" if torch.cuda.is_available() else "cpu")
    engine = LLMEngine(model, EngineConfig(max_num_seqs=args.concurrency, max_model_len=args.max_model_len,
                                           max_num_batched_tokens=args.max_num_batched_tokens))
    vocab = model.config.vocab_size
    run_requests(engine, level_prompts(args.concurrency, 0, args.prompt_len, vocab), 8)  # warm-up
    prof = cProfile.Profile()
    prof.enable()
    res = run_requests(engine, level_prompts(args.concurrency, 1, args.prompt_len, vocab), args.output_len)
    prof.disable()
    print(f"engine alone: {res}")
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(TOP)
    print(text.getvalue())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="checkpoint folder (e.g. bench/random_checkpoint.py's)")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--requests", type=int, default=None, help="requests in the level (default 2 x concurrency)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--clients", default="1", help="client processes (bench/serve_load.py --clients); a list "
                   "(1,4) runs one profiled level per value")
    p.add_argument("--duration", type=int, default=12, help="seconds py-spy samples (cover the level)")
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument("--idle", action="store_true", help="count idle samples too (shares of wall time)")
    p.add_argument("--engine-only", action="store_true", help="cProfile the engine loop instead of the server")
    p.add_argument("--max-model-len", type=int, default=4096, help="engine-only: context of the engine")
    p.add_argument("--max-num-batched-tokens", type=int, default=8192, help="engine-only: step token budget")
    args, extra = p.parse_known_args()
    if extra[:1] == ["--"]:
        extra = extra[1:]
    engine_only(args) if args.engine_only else served(args, extra)


if __name__ == "__main__":
    main()
