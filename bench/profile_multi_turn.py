"""The multi-turn chat workload of ``bench/serve_load.py --multi-turn`` through the engine alone, with a log of
every step — to tell what the engine costs from what the served path adds.

``--sessions`` chat sessions in lock step: each starts from its own ``--history-len`` prompt; every turn
resends the conversation (its previous prompt, its reply and ``--user-len`` new tokens; the reply's ids are
resent as they were sampled, so the whole history is in the prefix cache); then as many fresh ``--fresh-len``
prompts at once, ``--turns`` times. Over HTTP the sessions drift out of phase (their first turns are prefilled
over several steps), so a turn's requests arrive while the others decode: ``--stagger N`` submits N per step,
which gives those mixed steps. Per phase it prints the TTFT of each request (from its submission to the step
that read its first token, in ms), and the rows, prefill and context tokens and wall time of its prefill steps
and the step after each (the time between two ``step()`` returns; with the overlap on CUDA, a step's wait for
the device shows in the next one). ``--profile PHASE`` (e.g. ``"turn 2"``, ``"fresh 1"``) also prints that
phase's operators by device time and by host time; ``--host-profile PHASE`` its Python functions by host
time (cProfile). Random weights of a released shape, engine sized as the server sizes it.

    python bench/profile_multi_turn.py --preset 7B --sessions 16 --turns 4
    python bench/profile_multi_turn.py --preset 7B --sessions 16 --turns 2 --stagger 2   # as over HTTP
    python bench/profile_multi_turn.py --preset tiny --sessions 4 --turns 2 --history-len 512   # CPU smoke run
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.random_checkpoint import PRESET_NAMES, bench_config  # noqa: E402
from telechat.engine.core import EngineConfig, LLMEngine  # noqa: E402
from telechat.engine.sampling import SamplingParams  # noqa: E402
from telechat.model.modeling import TelechatForCausalLM  # noqa: E402


class StepLog:
    """Wraps the engine's scheduler: records each step's shape; :meth:`mark` adds the step's wall time."""

    def __init__(self, engine: LLMEngine):
        self.steps: list[dict] = []
        self._schedule = engine.scheduler.schedule
        engine.scheduler.schedule = self._record
        self._last = time.perf_counter()

    def _record(self):
        out = self._schedule()
        ctx = [c.start for c in out.prefills if c.start > 0]
        self.steps.append({"decodes": len(out.decodes), "prefills": len(out.prefills),
                           "prefill_tokens": sum(c.num_tokens for c in out.prefills),
                           "context_chunks": len(ctx), "context_tokens": sum(ctx)})
        return out

    def mark(self) -> None:
        """Called after each ``step()``: the time since the previous one goes to the last step scheduled."""
        now = time.perf_counter()
        if self.steps:
            self.steps[-1].setdefault("ms", (now - self._last) * 1e3)
        self._last = now


def run_phase(engine: LLMEngine, log: StepLog, prompts: list[list[int]], params: SamplingParams, stagger: int = 0
              ) -> tuple[list[float], list[list[int]], list[dict]]:
    """Submit ``prompts`` (at once, or ``stagger`` more before each step) and step until all end: (TTFT ms of
    each from its own submission, output ids of each, the steps)."""
    first = len(log.steps)
    log.mark()
    pending = list(enumerate(prompts))
    ids: list[str] = [""] * len(prompts)
    submitted: dict[str, float] = {}
    ttft: dict[str, float] = {}
    outputs: dict[str, list[int]] = {}
    while pending or engine.has_unfinished():
        arriving, pending = pending[: stagger or len(pending)], pending[stagger or len(pending):]
        for i, prompt in arriving:
            ids[i] = engine.add_request(prompt, params)
            submitted[ids[i]], outputs[ids[i]] = time.perf_counter(), []
        for out in engine.step():
            if out.new_token_ids and out.request_id not in ttft:
                ttft[out.request_id] = (time.perf_counter() - submitted[out.request_id]) * 1e3
            outputs[out.request_id].extend(out.new_token_ids)
        log.mark()
    return [ttft[i] for i in ids], [outputs[i] for i in ids], log.steps[first:]


def phase(name: str, engine: LLMEngine, log: StepLog, prompts: list[list[int]], params: SamplingParams,
          args: argparse.Namespace) -> tuple[list[float], list[list[int]], list[dict]]:
    """:func:`run_phase`, under the torch profiler when ``name`` is the ``--profile`` phase, under cProfile
    when it is the ``--host-profile`` one."""
    if name == args.host_profile:
        host = cProfile.Profile()
        result = host.runcall(run_phase, engine, log, prompts, params, args.stagger)
        pstats.Stats(host).sort_stats("tottime").print_stats(30)
        return result
    if name != args.profile:
        return run_phase(engine, log, prompts, params, args.stagger)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        result = run_phase(engine, log, prompts, params, args.stagger)
    for key in ("cuda_time_total", "self_cpu_time_total"):
        print(prof.key_averages().table(sort_by=key, row_limit=20, max_name_column_width=70))
    return result


def describe(name: str, ttft: list[float], steps: list[dict]) -> None:
    """Print the phase's TTFT spread, its prefill steps one by one and its decode steps in summary."""
    decode_ms = [s["ms"] for s in steps if not s["prefills"] and "ms" in s]
    print(f"{name}: TTFT p50 {statistics.median(ttft):.1f} ms, max {max(ttft):.1f} ms; "
          f"{len(steps)} steps, decode-only median {statistics.median(decode_ms) if decode_ms else 0:.2f} ms")
    for i, s in enumerate(steps):
        if s["prefills"] or (i and steps[i - 1]["prefills"]):  # with overlap a step's wait shows in the next one
            print(f"    step {i:3d}: {s['decodes']:3d} decodes + {s['prefills']:3d} prefill chunks of "
                  f"{s['prefill_tokens']:6d} tokens ({s['context_chunks']} over {s['context_tokens']} cached "
                  f"context tokens): {s.get('ms', float('nan')):8.2f} ms")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="7B", choices=PRESET_NAMES)
    p.add_argument("--sessions", type=int, default=16)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--history-len", type=int, default=4224)
    p.add_argument("--user-len", type=int, default=40)
    p.add_argument("--fresh-len", type=int, default=131)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192, help="the server's step budget")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--stagger", type=int, default=0, metavar="N",
                   help="submit a phase's requests N per step (as sessions out of phase arrive over HTTP: their "
                        "prefills share steps with the others' decodes); 0 = all at once")
    p.add_argument("--profile", default="", metavar="PHASE", help='torch-profile this phase ("turn 2", "fresh 1")')
    p.add_argument("--host-profile", default="", metavar="PHASE", help="cProfile this phase (host time by function)")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    with device:
        model = TelechatForCausalLM(bench_config(args.preset, seq_length=args.max_model_len))
    model = model.to(torch.bfloat16 if device.type == "cuda" else torch.float32).eval()
    engine = LLMEngine(model, EngineConfig(max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                                           max_num_batched_tokens=args.max_num_batched_tokens))
    log = StepLog(engine)
    vocab = model.config.vocab_size
    rng = random.Random(0)
    toks = lambda n: [rng.randrange(100, vocab - 1) for _ in range(n)]  # noqa: E731
    params = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    run_phase(engine, log, [toks(args.fresh_len)], params)  # warm-up
    prompts = [toks(args.history_len + args.user_len) for _ in range(args.sessions)]
    for turn in range(1, args.turns + 1):
        ttft, replies, steps = phase(f"turn {turn}", engine, log, prompts, params, args)
        describe(f"turn {turn} ({args.sessions} sessions, prompts of {len(prompts[0])} tokens)", ttft, steps)
        prompts = [p + r + toks(args.user_len) for p, r in zip(prompts, replies)]
    for i in range(1, min(args.turns, 3) + 1):
        fresh = [toks(args.fresh_len) for _ in range(args.sessions)]
        ttft, _, steps = phase(f"fresh {i}", engine, log, fresh, params, args)
        describe(f"fresh {i} ({args.sessions} prompts of {args.fresh_len} tokens)", ttft, steps)
    print(f"prefix cache: {engine.scheduler.pool.hits} of {engine.scheduler.pool.queries} looked-up tokens found")


if __name__ == "__main__":
    main()
