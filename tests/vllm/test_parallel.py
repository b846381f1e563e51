"""Model parallelism on CPU: two vLLM workers, each with half the model, give our native greedy tokens."""

from __future__ import annotations

import os

import pytest

from tests.vllm.conftest import PROMPTS, Native

NEW_TOKENS = 12


@pytest.fixture
def two_cpu_workers(monkeypatch) -> None:
    """vLLM's automatic binding wants a NUMA node per worker; pin one CPU per rank instead ("0|1")."""
    cpus = sorted(os.sched_getaffinity(0))
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "|".join(map(str, cpus[:2])) if len(cpus) > 1 else "nobind")


def _assert_native_greedy(llm, folder) -> None:
    from vllm import SamplingParams

    native = Native(folder)
    prompts = [native.encode(p) for p in PROMPTS]
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False)
    for ids, out in zip(prompts, outputs):
        assert list(out.outputs[0].token_ids) == native.greedy(ids, NEW_TOKENS)


def test_tensor_parallel_2_gives_native_greedy_tokens(tiny_12b, llm_factory, two_cpu_workers):
    """TP=2 (multiprocessing workers, gloo) on the 12B layout: heads, FFN and vocabulary split in two."""
    llm = llm_factory(tiny_12b, tensor_parallel_size=2, distributed_executor_backend="mp")
    assert llm.llm_engine.vllm_config.parallel_config.tensor_parallel_size == 2
    _assert_native_greedy(llm, tiny_12b)


def test_pipeline_parallel_2_gives_native_greedy_tokens(tiny_7b, llm_factory, two_cpu_workers):
    """PP=2 on the 7B layout: one block per stage, and the tied head on the last stage loads the
    embedding it shares with the first. Compiled mode: in eager mode vLLM 0.32's CPU runner never
    allocates the buffers that carry hidden states between stages (only its compile warm-up does)."""
    llm = llm_factory(tiny_7b, pipeline_parallel_size=2, distributed_executor_backend="mp", enforce_eager=False)
    assert llm.llm_engine.vllm_config.parallel_config.pipeline_parallel_size == 2
    _assert_native_greedy(llm, tiny_7b)
