"""The serving benchmarks' CPU paths (tiny random-weight model, a few tokens), so the scripts cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bench.random_checkpoint import DONE, write_random_checkpoint, write_random_gptq
from bench.serve_load import cached_fraction, multi_turn_rows
from bench.serving_suite import TINY, expected_keys, size_tag, targets
from tests.conftest import REPO

PROVENANCE = ("date", "command", "commit", "device", "torch")


def run_script(*argv: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def result(start: float, stamps: list[float], tokens: int, prompt: int | None = None, cached: int | None = None,
           turn: int | None = None) -> dict:
    """A request as chat_stream returns it (times in seconds)."""
    return {"start": start, "stamps": stamps, "tokens": tokens, "prompt_tokens": prompt, "cached_tokens": cached,
            "turn": turn}


# ---------------------------------------------------------------------------------------------- pure summaries

def test_prefix_ttft_ratio_compares_later_turns_with_fresh_prompts():
    """Turn 1 (history not cached yet) stays out of the ratio; turns >= 2 are divided by the fresh prompts' TTFT."""
    turns = [result(0, [0.5, 0.6], 2, 4000, 0, turn=1), result(0, [0.03, 0.04], 2, 4100, 4000, turn=2),
             result(0, [0.03, 0.05], 2, 4200, 4100, turn=3)]
    fresh = [result(0, [0.02, 0.03], 2, 128, 0), result(0, [0.02, 0.04], 2, 128, 0)]
    per_turn, summary = multi_turn_rows(1, turns, 1.0, fresh, 1.0)
    assert [r["turn"] for r in per_turn] == [1, 2, 3]
    assert summary["first_turn_ttft_p50_ms"] == 500.0
    assert summary["cached_ttft_p50_ms"] == 30.0 and summary["fresh_ttft_p50_ms"] == 20.0
    assert summary["prefix_ttft_ratio"] == 1.5
    assert summary["cached_fraction"] == round(8100 / 8300, 4)
    assert summary["first_turn_prompt_tokens"] == 4000 and summary["last_turn_prompt_tokens"] == 4200


def test_cached_fraction_is_none_when_the_server_does_not_report_it():
    """A server without usage.prompt_tokens_details gives no cached share, not a share of 0."""
    assert cached_fraction([result(0, [1], 1, 100, None), result(0, [1], 1, 100, 50)]) is None
    assert cached_fraction([result(0, [1], 1, 100, 25), result(0, [1], 1, 100, 75)]) == 0.5


def test_suite_key_names_follow_the_workload():
    """Figure names carry the sizes actually measured (c64, 1k, 32k for the H200 run)."""
    assert size_tag(1024) == "1k" and size_tag(32768) == "32k" and size_tag(48) == "48"
    keys = expected_keys(TINY)
    assert f"engine_c{TINY.concurrency}_tok_s" in keys and "engine_c64_tok_s" not in keys


def test_targets_judge_present_figures_and_leave_missing_ones_open():
    """A figure a failed part never measured is neither met nor missed."""
    from bench.serving_suite import FULL

    rows = {t["measure"]: t for t in targets({"engine_bs1_tok_s": 90, "roofline_bs1_tok_s": 100,
                                              "prefix_ttft_ratio": 1.6}, FULL)}
    assert rows["engine bs1 / copy roofline"]["met"] is True
    assert rows["cached-history turn TTFT / fresh"]["met"] is False
    assert rows["TTFT 1k prompt idle (ms)"]["met"] is None


def test_suite_keeps_figures_of_a_failed_part(tmp_path):
    """A part that fails is named under errors, and the summary on disk keeps the rows it wrote before."""
    from types import SimpleNamespace

    from bench.serving_suite import Suite, engine_figures

    args = SimpleNamespace(out=tmp_path / "suite.json", work_dir=tmp_path, preset="tiny")
    suite = Suite(args, TINY)
    part_json = tmp_path / "parts" / "engine.json"
    script = ("import json, pathlib, sys; p = pathlib.Path(sys.argv[1]); p.parent.mkdir(parents=True); "
              "p.write_text(json.dumps({'device': 'cpu', 'torch': 'x', 'results': "
              "[{'measure': 'hf_generate_bs1', 'tok_s': 12.5}]})); sys.exit(3)")
    assert not suite.run("engine", [sys.executable, "-c", script, str(part_json)], engine_figures)
    s = json.loads(args.out.read_text())
    assert s["errors"] == {"engine": "exited with 3"}
    assert s["hf_bs1_tok_s"] == 12.5 and s["engine_bs1_tok_s"] is None and s["gpu"] == "cpu"


# ---------------------------------------------------------------------------------------------- scripts on CPU

def test_random_checkpoint_is_reused(tmp_path):
    """A folder that already holds the shape is not rewritten (the suite writes the 7B once)."""
    out = write_random_checkpoint("tiny", tmp_path / "tiny")
    weights = next(out.glob("*.safetensors"))
    stamp = weights.stat().st_mtime_ns
    assert write_random_checkpoint("tiny", out) == out
    assert weights.stat().st_mtime_ns == stamp and (out / DONE).is_file()


@pytest.mark.parametrize("bits", [4, 8])
def test_random_gptq_checkpoint_loads_with_symmetric_codes(tmp_path, bits):
    """bench/random_checkpoint.py --gptq-bits: the quant loader reads the folder as GPTQ, and each quantized
    Linear computes with weights (code - 2**(bits-1)) × scale — the symmetric zero point the file declares —
    unpacked here from the checkpoint's own tensors."""
    pytest.importorskip("gptqmodel")
    import torch
    from safetensors.torch import load_file

    from telechat.model.quantized import load_quantized

    path = write_random_gptq("tiny", tmp_path / "q", bits=bits, group_size=32)
    model = load_quantized(path, device="cpu", dtype="float32")
    tensors = load_file(str(path / "model.safetensors"))
    key = "transformer.h.1.mlp.down_proj"
    packed, scales = tensors[key + ".qweight"], tensors[key + ".scales"].float()
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    codes = ((packed[:, None, :] >> shifts[None, :, None]) & (2 ** bits - 1)).reshape(-1, packed.shape[1])
    weight = (codes - 2 ** (bits - 1)).float() * scales.repeat_interleave(32, dim=0)  # [K, N]
    x = torch.randn(3, weight.shape[0])
    got, want = model.get_submodule(key)(x), x @ weight
    # the kernel rounds to fp16 on the way; a zero point off by one level would be ≈ 20 % off
    assert float((got - want).norm() / want.norm()) < 0.01
    assert write_random_gptq("tiny", tmp_path / "q", bits=bits, group_size=32) == path  # reused, not rewritten


def test_serve_load_writes_api_and_engine_rows(tmp_path):
    """The completions load test and its in-process engine baseline both report, with provenance in --json."""
    path = tmp_path / "load.json"
    proc = run_script("bench/serve_load.py", "--random-weights", "tiny", "--concurrency", "2", "--requests", "2",
                      "--prompt-len", "8", "--output-len", "4", "--json", str(path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(path.read_text())
    assert all(data[k] for k in PROVENANCE)
    rows = {r["mode"]: r for r in data["results"]}
    assert set(rows) == {"api", "engine"}
    assert rows["api"]["output_tok_s"] > 0 and rows["engine"]["output_tok_s"] > 0
    # the server's own TTFT of the level (its /metrics histograms) beside the clients', and the engine's share
    api = rows["api"]
    assert 0 < api["server_ttft_mean_ms"] <= api["ttft_mean_ms"] and api["server_ttft_p99_le_ms"] > 0
    assert 0 < api["server_queue_mean_ms"] + api["server_prefill_mean_ms"] <= api["server_ttft_mean_ms"]


def test_serving_suite_tiny_reports_every_figure(tmp_path):
    """The one-go suite runs every part on CPU and fills every figure; parts keep their rows and provenance."""
    out = tmp_path / "suite.json"
    proc = run_script("bench/serving_suite.py", "--preset", "tiny", "--work-dir", str(tmp_path / "work"),
                      "--out", str(out), "--commit", "abc1234")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    s = json.loads(out.read_text())
    assert s["errors"] == {} and s["commit"] == "abc1234"
    missing = [k for k in expected_keys(TINY) if s[k] is None and not k.startswith("cached_fraction")]
    assert missing == []
    assert set(s["parts"]) == {"engine", "http", "multi_turn"}
    for part in s["parts"].values():
        assert all(part[k] for k in PROVENANCE) and part["commit"] == "abc1234"
    summaries = [r for r in s["parts"]["multi_turn"]["results"] if r["mode"] == "multi_turn"]
    assert [r["sessions"] for r in summaries] == [TINY.sessions, 1]
    for r in summaries:
        # Every turn resends the history and adds a reply and a user message.
        assert r["last_turn_prompt_tokens"] > r["first_turn_prompt_tokens"] >= TINY.history_tokens * 0.75
        assert r["fresh_prompt_tokens"] == pytest.approx(TINY.fresh_tokens, rel=0.25)
        # the server's own split of each phase: its queue and prefill share within its TTFT
        for phase in ("sessions", "fresh"):
            engine = r[f"{phase}_server_queue_mean_ms"] + r[f"{phase}_server_prefill_mean_ms"]
            assert 0 < engine <= r[f"{phase}_server_ttft_mean_ms"]


def test_engine_bench_measures_constrained_fractions(tmp_path):
    """bench/engine.py --constrained-fraction: one row per fraction, every request generating its tokens,
    and no run's prompts served from the prefix cache (each fraction once reused the 0 run's prompts: the
    others prefilled 112 of 128 tokens from the cache, through another attention path, and their TTFT and
    wall time measured that instead of the constraint)."""
    path = tmp_path / "engine.json"
    proc = run_script("bench/engine.py", "--preset", "tiny", "--concurrency", "4", "--new-tokens", "8",
                      "--ttft-prompt", "16", "--long-prompt", "0", "--max-model-len", "256", "--skip-hf",
                      "--constrained-fraction", "0,0.5,1", "--json", str(path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(path.read_text())["results"]
    rows = [r for r in results if r["measure"] == "engine_constrained"]
    assert [r["constrained_fraction"] for r in rows] == [0.0, 0.5, 1.0]
    assert all(r["output_tokens"] == 4 * 8 and r["tok_s"] > 0 for r in rows)
    measured = [r for r in results if r["measure"] in ("engine_concurrency", "engine_constrained")]
    assert len(measured) == 4 and all(r["cached_prompt_tokens"] == 0 for r in measured)


def test_fp8_bench_compares_every_weight_and_cache_combination(tmp_path):
    """bench/fp8_engine.py: bf16 / FP8 weights × bf16 / FP8 cache rows, the FP8-head row, then the GPTQ int4 row,
    the long-request rows and the summary keys issue 20 records."""
    pytest.importorskip("gptqmodel")
    path = tmp_path / "fp8.json"
    proc = run_script("bench/fp8_engine.py", "--preset", "tiny", "--concurrency", "4", "--new-tokens", "8",
                      "--long-prompt", "300", "--max-model-len", "512", "--repeats", "2", "--int4", "--group-size", "32",
                      "--work-dir", str(tmp_path / "work"), "--json", str(path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(path.read_text())
    rows = [(r["weights"], r["kv_cache"]) for r in data["results"] if r["measure"] == "fp8_engine"]
    assert rows == [("bf16", "auto"), ("bf16", "fp8"), ("fp8", "auto"), ("fp8", "fp8"), ("fp8+head", "fp8"),
                    ("int4", "auto")]
    for r in (r for r in data["results"] if r["measure"] == "fp8_engine"):  # medians of the two timed runs
        assert len(r["bs1_runs"]) == len(r["concurrent_runs"]) == 2
        assert r["bs1_tok_s"] == sum(r["bs1_runs"]) / 2 and r["concurrent_tok_s"] == sum(r["concurrent_runs"]) / 2
        # the rate after the first token leaves the prefill out: faster than the whole request's
        assert r["bs1_ttft_ms"] > 0 and r["concurrent_ttft_ms"] > 0 and r["bs1_decode_tok_s"] > r["bs1_tok_s"]
    assert all(k in data for k in ("fp8_bs1_speedup", "fp8_bs1_decode_speedup", "fp8_c64_speedup",
                                   "fp8_kv_capacity_ratio", "fp8_head_bs1_speedup", "fp8_head_bs1_decode_speedup",
                                   "fp8_head_c64_speedup", "int4_bs1_speedup", "int4_c64_speedup", *PROVENANCE))
    kernels = [r["kernel"] for r in data["results"] if r["measure"] == "int4_kernel"]
    assert len(kernels) == 1 and kernels[0] != "Linear", kernels  # a GPTQ kernel, not a dense Linear
    long_rows = [r for r in data["results"] if r["measure"] == "fp8_long_request"]
    assert [r["kv_cache"] for r in long_rows] == ["auto", "fp8"] and all(r["wall_s"] for r in long_rows)


def test_multi_turn_profile_serves_later_turns_from_the_cache():
    """bench/profile_multi_turn.py: the first turn prefills its whole history, later turns only their new tokens
    over the cached history (the replies are resent as sampled), and fresh prompts have no context."""
    proc = run_script("bench/profile_multi_turn.py", "--preset", "tiny", "--sessions", "3", "--turns", "2",
                      "--history-len", "200", "--user-len", "20", "--output-len", "8", "--fresh-len", "40")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    turn1, turn2, fresh = (out.split(f"{name} (")[1].split("\n    step", 1)[1]
                           for name in ("turn 1", "turn 2", "fresh 1"))
    assert "3 prefill chunks of    660 tokens (0 over 0 cached" in turn1  # 3 x (200 + 20)
    # Turn 2: 3 x 248 tokens; turn 1 computed 228 per session (prompt and reply but its last token): 14 full
    # blocks (224) each are cached, 24 new tokens per session.
    assert "3 prefill chunks of     72 tokens (3 over 672 cached context tokens)" in turn2
    assert "3 prefill chunks of    120 tokens (0 over 0 cached" in fresh
    assert "prefix cache: 672 of" in out


def test_multi_turn_profile_staggers_arrivals_into_mixed_steps():
    """``--stagger 1``: one request of the phase arrives per step, so each later turn's prefill shares its step
    with the earlier sessions' decodes (the arrival pattern of sessions out of phase over HTTP)."""
    proc = run_script("bench/profile_multi_turn.py", "--preset", "tiny", "--sessions", "3", "--turns", "2",
                      "--history-len", "200", "--user-len", "20", "--output-len", "8", "--fresh-len", "40",
                      "--stagger", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    turn2 = proc.stdout.split("turn 2 (")[1].split("\nfresh 1")[0]
    assert "step   0:   0 decodes +   1 prefill chunks of     24 tokens (1 over 224 cached" in turn2
    assert "step   1:   1 decodes +   1 prefill chunks of     24 tokens (1 over 224 cached" in turn2
    assert "step   2:   2 decodes +   1 prefill chunks of     24 tokens (1 over 224 cached" in turn2
