"""The serving measurement of one card in one go: engine, HTTP load and multi-turn chat on random 7B weights.

    python bench/serving_suite.py --commit "$(git rev-parse --short HEAD)"     # one H200: ~5 min
    python bench/serving_suite.py --preset tiny --out /tmp/suite.json          # CPU smoke run

Parts, each in its own process and one after another (the GPU is free between them):

1. ``checkpoint``: random-init weights of the shape (bf16 on CUDA) with the demo tokenizer, written
   to ``--work-dir`` once and reused by the later parts and later runs (bench/random_checkpoint.py).
2. ``engine``: bench/engine.py on that checkpoint: copy-bandwidth roofline, transformers
   ``generate()`` at batch 1 (the baseline), engine single-stream decode, TTFT of a 1k-token prompt,
   128 requests of 128 in / 256 out at 64 concurrent (two waves: the HTTP part's workload), prefill of a
   32k-token prompt.
3. ``http``: one ``telechat serve`` (``python -m services.api``; ``--api-server-count N``: N API processes
   over one engine core) on the checkpoint, and
   bench/serve_load.py against it: 64 concurrent ``/v1/completions`` streams, 128 in / 256 out, 128
   requests from 4 client processes.
4. ``multi_turn``: bench/serve_load.py ``--multi-turn`` against the same server: 16 chat sessions of
   10 turns over 4k-token histories vs fresh 128-token prompts (``prefix_ttft_ratio``), then one
   session alone.

``--out`` holds the summary (the keys below, ``targets`` from docs/conventions.md, every part's raw
rows under ``parts``) and is rewritten after every part: a part that fails or hangs is named under
``errors`` and the others still run and keep their figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.random_checkpoint import PRESET_NAMES  # noqa: E402
from bench.report import git_commit  # noqa: E402
from bench.serve_load import start_server, stop_server  # noqa: E402


@dataclass(frozen=True)
class Workload:
    """Sizes of every part (docs/conventions.md, performance targets)."""

    concurrency: int = 64
    prompt_len: int = 128
    new_tokens: int = 256
    ttft_prompt: int = 1024
    long_prompt: int = 32768
    """0 skips the long prefill."""
    max_model_len: int | None = None
    """Engine part's context (default: long prompt + 16, at least 8192)."""
    sessions: int = 16
    turns: int = 10
    history_tokens: int = 4096
    user_tokens: int = 32
    turn_tokens: int = 128
    """Reply tokens per turn (and per fresh prompt)."""
    fresh_tokens: int = 128
    api_servers: int = 1
    """API processes of the served parts (the suite's ``--api-server-count``; default: the server's default)."""
    http_clients: int = 4
    """Client processes of the HTTP load part (one Python client parsing ~8,000 SSE events/s is itself a bottleneck)."""
    part_timeout_s: int = 300
    """Wall-clock limit of one part; a part past it is killed and named under ``errors``."""


FULL = Workload()
TINY = Workload(concurrency=4, prompt_len=16, new_tokens=8, ttft_prompt=64, long_prompt=0, max_model_len=512,
                sessions=2, turns=3, history_tokens=256, user_tokens=16, turn_tokens=8, fresh_tokens=48,
                http_clients=2, part_timeout_s=240)


def size_tag(tokens: int) -> str:
    """``1024`` -> ``1k``, ``32768`` -> ``32k``, ``48`` -> ``48``."""
    return f"{tokens // 1024}k" if tokens % 1024 == 0 else str(tokens)


def expected_keys(w: Workload) -> list[str]:
    """The figures a complete run of workload ``w`` reports (None until measured)."""
    c = w.concurrency
    keys = ["gpu", "torch", "copy_bandwidth_tbs", "roofline_bs1_tok_s", "hf_bs1_tok_s", "engine_bs1_tok_s",
            f"ttft_{size_tag(w.ttft_prompt)}_ms", f"engine_c{c}_tok_s", f"http_c{c}_tok_s",
            f"http_c{c}_ttft_p50_s", f"http_c{c}_ttft_p99_s", "prefix_ttft_ratio", "prefix_ttft_ratio_1_session",
            "cached_fraction"]
    if w.long_prompt:
        keys.append(f"prefill_{size_tag(w.long_prompt)}_s")
    return keys


# ---------------------------------------------------------------------------------------------- figures of each part

def engine_figures(rows: list[dict]) -> dict:
    """Summary keys from bench/engine.py's rows."""
    out: dict = {}
    for r in rows:
        m = r["measure"]
        if m == "roofline":
            out.update(copy_bandwidth_tbs=r["copy_TBps"], weights_gb=r["weights_GB"],
                       roofline_bs1_tok_s=r["bs1_roofline_tok_s"])
        elif m == "hf_generate_bs1":
            out["hf_bs1_tok_s"] = r["tok_s"]
        elif m == "engine_start":
            out["engine_start_s"] = r["seconds"]
        elif m == "engine_bs1_decode":
            out["engine_bs1_tok_s"] = r["tok_s"]
        elif m == "engine_ttft":
            out[f"ttft_{size_tag(r['prompt_tokens'])}_ms"] = r["ms_median"]
        elif m == "engine_concurrency":
            out[f"engine_c{r['concurrency']}_tok_s"] = r["tok_s"]
        elif m == "engine_long_prefill":
            out[f"prefill_{size_tag(r['prompt_tokens'])}_s"] = r["ttft_s"]
    return out


def http_figures(rows: list[dict]) -> dict:
    """Summary keys from bench/serve_load.py's completions rows."""
    out: dict = {}
    for r in rows:
        if r["mode"] == "api":
            c = r["concurrency"]
            out.update({f"http_c{c}_tok_s": r["output_tok_s"],
                        f"http_c{c}_ttft_p50_s": round(r["ttft_p50_ms"] / 1e3, 4),
                        f"http_c{c}_ttft_p99_s": round(r["ttft_p99_ms"] / 1e3, 4),
                        f"http_c{c}_itl_mean_ms": r["itl_mean_ms"],
                        f"http_c{c}_client_cpu_share": r.get("client_cpu_share")})
    return out


def multi_turn_figures(rows: list[dict], sessions: int) -> dict:
    """Summary keys from bench/serve_load.py ``--multi-turn`` rows: the ``sessions`` level, and one session alone."""
    out: dict = {}
    for r in rows:
        if r["mode"] != "multi_turn":
            continue
        if r["sessions"] == sessions:
            out.update(prefix_ttft_ratio=r["prefix_ttft_ratio"], prefix_ttft_ratio_p99=r["prefix_ttft_ratio_p99"],
                       cached_fraction=r["cached_fraction"], multi_turn_sessions=sessions,
                       multi_turn_cached_ttft_p50_ms=r["cached_ttft_p50_ms"],
                       multi_turn_fresh_ttft_p50_ms=r["fresh_ttft_p50_ms"],
                       multi_turn_first_turn_ttft_p50_ms=r["first_turn_ttft_p50_ms"],
                       multi_turn_output_tok_s=r["output_tok_s"])
        if r["sessions"] == 1:
            out.update(prefix_ttft_ratio_1_session=r["prefix_ttft_ratio"],
                       cached_fraction_1_session=r["cached_fraction"])
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b rounded, or None when either is missing."""
    return round(a / b, 3) if a is not None and b else None


def targets(s: dict, w: Workload) -> list[dict]:
    """docs/conventions.md's performance targets against this run's figures (7B shape on one GPU)."""
    c, ttft, long = w.concurrency, size_tag(w.ttft_prompt), size_tag(w.long_prompt)
    rows = [
        ("engine bs1 / copy roofline", ratio(s.get("engine_bs1_tok_s"), s.get("roofline_bs1_tok_s")), ">=", 0.80),
        (f"engine {c} concurrent tok/s", s.get(f"engine_c{c}_tok_s"), ">=", 8000),
        (f"HTTP / engine at {c}", ratio(s.get(f"http_c{c}_tok_s"), s.get(f"engine_c{c}_tok_s")), ">=", 0.90),
        (f"HTTP TTFT p99 at {c} (s)", s.get(f"http_c{c}_ttft_p99_s"), "<=", 0.3),
        (f"TTFT {ttft} prompt idle (ms)", s.get(f"ttft_{ttft}_ms"), "<=", 30),
        (f"prefill {long} prompt (s)", s.get(f"prefill_{long}_s"), "<=", 2.0),
        ("cached-history turn TTFT / fresh", s.get("prefix_ttft_ratio"), "<=", 1.5),
    ]
    return [{"measure": name, "value": v, "target": f"{op} {t}",
             "met": None if v is None else (v >= t if op == ">=" else v <= t)} for name, v, op, t in rows]


# ---------------------------------------------------------------------------------------------- running parts

class Suite:
    """The summary being built, written to ``out`` after every part."""

    def __init__(self, args: argparse.Namespace, workload: Workload):
        self.out, self.work, self.w, self.preset = args.out, args.work_dir, workload, args.preset
        self.started = time.perf_counter()
        self.summary: dict = {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": shlex.join(["python", *sys.argv]), "commit": git_commit(),
            "model": f"TeleChat-{args.preset} shape, random weights, bf16 on CUDA (float32 on CPU), demo tokenizer",
            "workload": asdict(workload), **dict.fromkeys(expected_keys(workload)),
            "errors": {}, "part_seconds": {}, "parts": {},
        }
        self.write()

    def log(self, msg: str) -> None:
        print(f"[suite {time.perf_counter() - self.started:6.1f}s] {msg}", flush=True)

    def write(self) -> None:
        s = self.summary
        s["http_over_engine"] = ratio(s.get(f"http_c{self.w.concurrency}_tok_s"),
                                      s.get(f"engine_c{self.w.concurrency}_tok_s"))
        s["engine_bs1_roofline_fraction"] = ratio(s.get("engine_bs1_tok_s"), s.get("roofline_bs1_tok_s"))
        s["engine_bs1_over_hf"] = ratio(s.get("engine_bs1_tok_s"), s.get("hf_bs1_tok_s"))
        s["targets"] = targets(s, self.w) if self.preset == "7B" else []  # the targets are for the 7B shape
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_name(self.out.name + ".tmp")
        ordered = {**{k: v for k, v in s.items() if k != "parts"}, "parts": s["parts"]}  # raw rows last
        tmp.write_text(json.dumps(ordered, indent=2) + "\n", encoding="utf-8")
        tmp.replace(self.out)

    def fail(self, part: str, error: str) -> None:
        self.summary["errors"][part] = error
        self.log(f"{part} FAILED: {error}")
        self.write()

    def run(self, part: str, cmd: list[str], figures: Callable[[list[dict]], dict] | None = None) -> bool:
        """Run one part's command; keep its rows (``--json`` there, even from a failed run) and figures."""
        part_json = self.work / "parts" / f"{part}.json"
        part_json.unlink(missing_ok=True)
        self.log(f"{part}: {shlex.join(cmd)}")
        t = time.perf_counter()
        try:
            rc = subprocess.run(cmd, cwd=REPO, timeout=self.w.part_timeout_s,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
            error = None if rc == 0 else f"exited with {rc}"
        except subprocess.TimeoutExpired:
            error = f"killed after {self.w.part_timeout_s} s"
        self.summary["part_seconds"][part] = round(time.perf_counter() - t, 1)
        if part_json.is_file():
            data = json.loads(part_json.read_text(encoding="utf-8"))
            self.summary["parts"][part] = data
            self.summary.update(gpu=self.summary["gpu"] or data["device"],
                                torch=self.summary["torch"] or data["torch"])
            if figures:
                self.summary.update(figures(data["results"]))
        if error:
            self.fail(part, error)
            return False
        self.log(f"{part} done in {self.summary['part_seconds'][part]} s")
        self.write()
        return True


def run_suite(args: argparse.Namespace, w: Workload) -> dict:
    """All parts in order; returns the summary (also in ``args.out``)."""
    suite = Suite(args, w)
    py, parts = sys.executable, args.work_dir / "parts"
    ckpt = args.work_dir / args.preset
    if not suite.run("checkpoint", [py, "bench/random_checkpoint.py", args.preset, str(ckpt)]):
        return suite.summary
    engine_cmd = [py, "bench/engine.py", "--model", str(ckpt), "--concurrency", str(w.concurrency),
                  "--max-num-seqs", str(w.concurrency), "--prompt-len", str(w.prompt_len),
                  "--new-tokens", str(w.new_tokens), "--ttft-prompt", str(w.ttft_prompt),
                  "--long-prompt", str(w.long_prompt), "--waves", "2", "--json", str(parts / "engine.json")]
    if w.max_model_len:
        engine_cmd += ["--max-model-len", str(w.max_model_len)]
    suite.run("engine", engine_cmd, engine_figures)

    suite.log(f"server: starting python -m services.api --api-server-count {w.api_servers} on the checkpoint")
    t = time.perf_counter()
    try:
        proc, url = start_server(ckpt, max(w.concurrency, w.sessions), ready_timeout=w.part_timeout_s,
                                 extra_args=["--api-server-count", str(w.api_servers)])
    except SystemExit as e:
        suite.fail("server", str(e))
        return suite.summary
    suite.summary["part_seconds"]["server_start"] = round(time.perf_counter() - t, 1)
    try:
        suite.run("http", [py, "bench/serve_load.py", "--url", url, "--model", str(ckpt), "--no-engine",
                           "--concurrency", str(w.concurrency), "--prompt-len", str(w.prompt_len),
                           "--output-len", str(w.new_tokens), "--clients", str(w.http_clients),
                           "--json", str(parts / "http.json")], http_figures)
        levels = f"{w.sessions},1" if w.sessions != 1 else "1"
        suite.run("multi_turn", [py, "bench/serve_load.py", "--url", url, "--multi-turn", "--concurrency", levels,
                                 "--turns", str(w.turns), "--history-tokens", str(w.history_tokens),
                                 "--user-tokens", str(w.user_tokens), "--output-len", str(w.turn_tokens),
                                 "--fresh-tokens", str(w.fresh_tokens), "--json", str(parts / "multi_turn.json")],
                  lambda rows: multi_turn_figures(rows, w.sessions))
    finally:
        stop_server(proc)
    suite.summary["part_seconds"]["total"] = round(time.perf_counter() - suite.started, 1)
    suite.write()
    return suite.summary


def print_summary(s: dict, w: Workload) -> None:
    """The figures and the targets as Markdown tables."""
    print("\n| figure | value |\n|---|---|")
    for k in ["gpu", *expected_keys(w)[1:], "http_over_engine", "engine_bs1_roofline_fraction", "engine_bs1_over_hf"]:
        print(f"| {k} | {s.get(k)} |")
    if s["targets"]:
        print("\n| measure | value | target | met |\n|---|---|---|---|")
    for t in s["targets"]:
        print(f"| {t['measure']} | {t['value']} | {t['target']} | {t['met']} |")
    if s["errors"]:
        print("\nfailed parts: " + "; ".join(f"{k}: {v}" for k, v in s["errors"].items()))


def default_api_servers() -> int:
    """The API process count ``telechat serve`` picks on this machine when none is given."""
    from services.api.main import api_server_count
    from services.api.settings import Settings

    return api_server_count(Settings())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="7B", choices=PRESET_NAMES,
                   help="shape of the random weights; tiny = CPU smoke run with tiny workloads")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="local folder for the checkpoint and the parts' rows (default /tmp/telechat-bench)")
    p.add_argument("--out", type=Path, default=None,
                   help="summary json (default bench/results/h200.json; with --preset tiny WORK_DIR/suite.json)")
    p.add_argument("--commit", help="commit to record (default: git, or BENCH_COMMIT; a copied tree has no .git)")
    p.add_argument("--api-server-count", type=int, default=None,
                   help="API processes of the served parts (default: the server's own default on this machine)")
    args = p.parse_args()
    if args.commit:
        os.environ["BENCH_COMMIT"] = args.commit  # the parts read it too
    args.work_dir = (args.work_dir or Path("/tmp/telechat-bench")).resolve()
    tiny = args.preset == "tiny"
    args.out = (args.out or (args.work_dir / "suite.json" if tiny else REPO / "bench/results/h200.json")).resolve()
    w = dataclasses.replace(TINY if tiny else FULL, api_servers=args.api_server_count or default_api_servers())
    summary = run_suite(args, w)
    print_summary(summary, w)
    print(f"\nwrote {args.out}")
    sys.exit(1 if summary["errors"] else 0)


if __name__ == "__main__":
    main()
